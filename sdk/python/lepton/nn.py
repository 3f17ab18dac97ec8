"""Inference through the standard ``wasi:nn`` interfaces (0.2.0-rc-2024-10-28).

The host loads the models the manifest grants (``models = ["magika"]``); a function
loads one by name and computes on tensors it builds from ``bytes``, ``array`` or lists
(and from numpy arrays, where numpy is importable)::

    graph = nn.Graph.load_by_name("magika")
    outputs = graph.compute({"bytes": nn.Tensor.from_i32([1, 2048], features)})
    scores = outputs["target_label"].to_f32()
"""

from __future__ import annotations

import array
import struct
from typing import Dict, Iterable, List, Mapping, Sequence, Union

from componentize_py_types import Err
from wit_world.imports import errors, graph as _graph, tensor as _tensor

TensorType = _tensor.TensorType

# Element sizes and `array` type codes of the types a list converts from and to.
_ARRAY_CODES = {
    TensorType.FP32: "f",
    TensorType.FP64: "d",
    TensorType.U8: "B",
    TensorType.I32: "i",
    TensorType.I64: "q",
}
_SIZES = {
    TensorType.FP16: 2,
    TensorType.BF16: 2,
    TensorType.FP32: 4,
    TensorType.FP64: 8,
    TensorType.U8: 1,
    TensorType.I32: 4,
    TensorType.I64: 8,
}
_NUMPY = {
    "float32": TensorType.FP32,
    "float64": TensorType.FP64,
    "float16": TensorType.FP16,
    "uint8": TensorType.U8,
    "int32": TensorType.I32,
    "int64": TensorType.I64,
}


class NnError(Exception):
    """A ``wasi:nn`` error: its code (``errors.ErrorCode``) and the host's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _error(err: Err) -> NnError:
    value = err.value
    if isinstance(value, errors.Error):
        return NnError(value.code().name.lower().replace("_", "-"), value.data())
    return NnError("runtime-error", str(value))


class Tensor:
    """Dimensions, an element type and row-major little-endian bytes."""

    def __init__(self, dimensions: Sequence[int], ty: TensorType, data: bytes) -> None:
        count = 1
        for d in dimensions:
            count *= d
        if count * _SIZES[ty] != len(data):
            raise ValueError(
                f"{len(data)} bytes do not make {list(dimensions)} elements of {ty.name}"
            )
        self.dimensions = list(dimensions)
        self.ty = ty
        self.data = bytes(data)

    @classmethod
    def from_list(cls, dimensions: Sequence[int], ty: TensorType, values: Iterable[Union[int, float]]) -> "Tensor":
        """A tensor of `values` (a list, tuple or ``array.array``), converted to `ty`."""
        code = _ARRAY_CODES.get(ty)
        if code is None:
            raise ValueError(f"{ty.name} tensors are built from bytes")
        packed = array.array(code, values)
        if array.array("i", [1]).tobytes()[0] != 1:  # big-endian host: never on wasm
            packed.byteswap()
        return cls(dimensions, ty, packed.tobytes())

    @classmethod
    def from_f32(cls, dimensions: Sequence[int], values: Iterable[float]) -> "Tensor":
        return cls.from_list(dimensions, TensorType.FP32, values)

    @classmethod
    def from_i32(cls, dimensions: Sequence[int], values: Iterable[int]) -> "Tensor":
        return cls.from_list(dimensions, TensorType.I32, values)

    @classmethod
    def from_i64(cls, dimensions: Sequence[int], values: Iterable[int]) -> "Tensor":
        return cls.from_list(dimensions, TensorType.I64, values)

    @classmethod
    def from_u8(cls, dimensions: Sequence[int], values: bytes) -> "Tensor":
        return cls(dimensions, TensorType.U8, bytes(values))

    @classmethod
    def from_numpy(cls, value) -> "Tensor":  # numpy.ndarray
        """A tensor of a numpy array's elements (copied, little-endian, C order)."""
        ty = _NUMPY.get(str(value.dtype))
        if ty is None:
            raise ValueError(f"numpy dtype {value.dtype} has no wasi-nn type")
        data = value.astype(value.dtype.newbyteorder("<"), order="C", copy=False).tobytes()
        return cls(value.shape, ty, data)

    def to_list(self) -> List[Union[int, float]]:
        """The elements, flat (FP16 and BF16 as floats)."""
        if self.ty == TensorType.FP16:
            return [v[0] for v in struct.iter_unpack("<e", self.data)]
        if self.ty == TensorType.BF16:
            return [
                struct.unpack("<f", b"\0\0" + self.data[i : i + 2])[0]
                for i in range(0, len(self.data), 2)
            ]
        return array.array(_ARRAY_CODES[self.ty], self.data).tolist()

    def to_f32(self) -> List[float]:
        """The elements of an FP32 tensor."""
        if self.ty != TensorType.FP32:
            raise ValueError(f"the tensor is {self.ty.name}, not FP32")
        return self.to_list()

    def to_numpy(self):
        """The tensor as a numpy array (needs numpy in the component)."""
        import numpy

        names = {v: k for k, v in _NUMPY.items()}
        dtype = numpy.dtype(names[self.ty]).newbyteorder("<")
        return numpy.frombuffer(self.data, dtype=dtype).reshape(self.dimensions)

    def _wit(self) -> _tensor.Tensor:
        return _tensor.Tensor(self.dimensions, self.ty, self.data)

    @classmethod
    def _from_wit(cls, value: _tensor.Tensor) -> "Tensor":
        return cls(value.dimensions(), value.ty(), value.data())


class Graph:
    """A model the host holds."""

    def __init__(self, graph: _graph.Graph) -> None:
        self._graph = graph

    @classmethod
    def load_by_name(cls, name: str) -> "Graph":
        """The model the manifest grants as `name` (``not-found`` otherwise)."""
        try:
            return cls(_graph.load_by_name(name))
        except Err as err:
            raise _error(err) from None

    def compute(self, inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Runs the model on `inputs` (by input name); its outputs by name."""
        try:
            context = self._graph.init_execution_context()
            outputs = context.compute([(name, t._wit()) for name, t in inputs.items()])
        except Err as err:
            raise _error(err) from None
        return {name: Tensor._from_wit(t) for name, t in outputs}

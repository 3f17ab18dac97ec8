"""The Open Inference Protocol tests' client side: `tritonclient[http]`, as users run it.

    v2_client.py models DIR     writes an identity model per datatype into DIR
    v2_client.py check URL DIR  checks the server at URL against native ONNX Runtime

Every check asserts; the script prints one JSON line of what it saw.
"""

import json
import sys

import numpy as np

# Datatype, numpy type (None: through ml_dtypes) and ONNX TensorProto code.
TYPES = [
    ("BOOL", np.bool_, 9),
    ("UINT8", np.uint8, 2),
    ("UINT16", np.uint16, 4),
    ("UINT32", np.uint32, 12),
    ("UINT64", np.uint64, 13),
    ("INT8", np.int8, 3),
    ("INT16", np.int16, 5),
    ("INT32", np.int32, 6),
    ("INT64", np.int64, 7),
    ("FP16", np.float16, 10),
    ("BF16", None, 16),
    ("FP32", np.float32, 1),
    ("FP64", np.float64, 11),
    ("BYTES", np.object_, 8),
]


def model_name(datatype):
    return "id-" + datatype.lower()


def write_models(directory):
    import onnx
    from onnx import helper

    for datatype, _, code in TYPES:
        x = helper.make_tensor_value_info("x", code, [None, 3])
        y = helper.make_tensor_value_info("y", code, [None, 3])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, f"{directory}/{model_name(datatype)}.onnx")
    print(json.dumps([model_name(t) for t, _, _ in TYPES]))


def sample(datatype, numpy_type, rows):
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        words = ["", "a", "héllo", "onnx", "lepton", "x" * 40]
        return np.array([[words[(r + c) % len(words)].encode() for c in range(3)] for r in range(rows)], dtype=np.object_)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=(rows, 3)).astype(np.bool_)
    if datatype == "BF16":
        import ml_dtypes

        return rng.standard_normal((rows, 3)).astype(ml_dtypes.bfloat16)
    if np.issubdtype(numpy_type, np.integer):
        info = np.iinfo(numpy_type)
        values = rng.integers(0, 1000, size=(rows, 3)).astype(numpy_type)
        values[0, 0] = info.max  # the extremes survive the trip, in JSON too
        values[0, 1] = info.min
        return values
    return rng.standard_normal((rows, 3)).astype(numpy_type)


def native(path, feeds):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check(url, directory):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(url=url, concurrency=1)
    seen = {}
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"], meta
    seen["server"] = meta["name"]

    # Every datatype, binary and JSON, both ways.
    for datatype, numpy_type, _ in TYPES:
        name = model_name(datatype)
        assert client.is_model_ready(name), name
        metadata = client.get_model_metadata(name)
        assert metadata["platform"] == "onnxruntime_onnx", metadata
        assert metadata["inputs"] == [{"name": "x", "datatype": datatype, "shape": [-1, 3]}], metadata
        assert metadata["outputs"] == [{"name": "y", "datatype": datatype, "shape": [-1, 3]}], metadata
        data = sample(datatype, numpy_type, 4)
        if datatype == "BF16":  # numpy, and so onnxruntime's Python API, has no bfloat16 of its own
            expected = data
        elif datatype == "BYTES":  # onnxruntime's Python API takes string tensors as str
            expected = native(f"{directory}/{name}.onnx", {"x": np.vectorize(bytes.decode, otypes=[np.object_])(data)})[0]
        else:
            expected = native(f"{directory}/{name}.onnx", {"x": data})[0]
        modes = [(True, True), (True, False)] if datatype == "BF16" else [(True, True), (False, False), (True, False), (False, True)]
        for binary_in, binary_out in modes:
            tensor = http.InferInput("x", list(data.shape), datatype)
            tensor.set_data_from_numpy(data, binary_data=binary_in)
            result = client.infer(name, [tensor], outputs=[http.InferRequestedOutput("y", binary_data=binary_out)], request_id=f"{name}-{binary_in}-{binary_out}")
            got = result.as_numpy("y")
            assert result.get_response()["id"] == f"{name}-{binary_in}-{binary_out}"
            if datatype == "BYTES":
                def text(array):
                    return [e.decode() if isinstance(e, bytes) else e for e in array.flatten().tolist()]

                assert got.shape == expected.shape, (got.shape, expected.shape)
                assert text(got) == text(expected), (binary_in, binary_out, got, expected)
            else:
                assert got.dtype == expected.dtype, (datatype, got.dtype)
                assert got.shape == expected.shape, (datatype, got.shape)
                assert np.array_equal(got, expected), (datatype, binary_in, binary_out, got, expected)
        seen[datatype] = "ok"

    # Magika: the same scores as native ONNX Runtime, on the protocol's default (binary out).
    rng = np.random.default_rng(3)
    features = rng.integers(0, 257, size=(3, 2048)).astype(np.int32)
    expected = native(f"{directory}/magika.onnx", {"bytes": features})[0]
    tensor = http.InferInput("bytes", [3, 2048], "INT32")
    tensor.set_data_from_numpy(features)
    got = client.infer("magika", [tensor]).as_numpy("target_label")
    assert got.shape == (3, 214), got.shape
    assert np.array_equal(got, expected), np.abs(got - expected).max()
    tensor.set_data_from_numpy(features, binary_data=False)
    got = client.infer("magika", [tensor], outputs=[http.InferRequestedOutput("target_label", binary_data=False)]).as_numpy("target_label")
    assert np.allclose(got, expected, rtol=1e-6, atol=0), np.abs(got - expected).max()
    version = client.get_model_metadata("magika")["versions"][0]
    assert client.is_model_ready("magika", model_version=version)
    got = client.infer("magika", [tensor], model_version=version).as_numpy("target_label")
    assert np.allclose(got, expected, rtol=1e-6, atol=0)
    seen["magika_version"] = version

    # What clients get wrong, and what they may not see.
    def refused(call):
        try:
            call()
        except InferenceServerException as error:
            return error.status(), error.message()
        raise AssertionError("not refused")

    wrong_shape = http.InferInput("bytes", [3, 2047], "INT32")
    wrong_shape.set_data_from_numpy(features[:, :2047].copy())
    seen["wrong_shape"] = refused(lambda: client.infer("magika", [wrong_shape]))
    wrong_type = http.InferInput("bytes", [3, 2048], "INT64")
    wrong_type.set_data_from_numpy(features.astype(np.int64))
    seen["wrong_type"] = refused(lambda: client.infer("magika", [wrong_type]))
    wrong_name = http.InferInput("nope", [3, 2048], "INT32")
    wrong_name.set_data_from_numpy(features)
    seen["wrong_name"] = refused(lambda: client.infer("magika", [wrong_name]))
    seen["wrong_output"] = refused(lambda: client.infer("magika", [tensor], outputs=[http.InferRequestedOutput("nope")]))
    seen["hidden"] = refused(lambda: client.get_model_metadata("hidden"))
    seen["unknown"] = refused(lambda: client.get_model_metadata("no-such-model"))
    seen["hidden_ready"] = client.is_model_ready("hidden")
    seen["old_version"] = refused(lambda: client.get_model_metadata("magika", model_version="999"))

    # The token: refused without it, served with it.
    x = http.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    seen["no_token"] = refused(lambda: client.infer("secret", [x]))
    seen["wrong_token"] = refused(lambda: client.infer("secret", [x], headers={"Authorization": "Bearer nope"}))
    got = client.infer("secret", [x], headers={"Authorization": "Bearer s3cret"}).as_numpy("y")
    assert np.array_equal(got, np.ones((1, 3), dtype=np.float32))
    print(json.dumps(seen))


if __name__ == "__main__":
    if sys.argv[1] == "models":
        write_models(sys.argv[2])
    else:
        check(sys.argv[2], sys.argv[3])

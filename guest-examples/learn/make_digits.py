"""Writes the `learn` example's data and its untrained model (run by ./setup.sh).

    .cache/venv/bin/python guest-examples/learn/make_digits.py [--root DIR]

- `.cache/data/digits/train.json`, `test.json`: scikit-learn's digits (8x8 images,
  1797 of them, shipped with scikit-learn, so nothing is downloaded), split 80/20,
  stratified, `random_state=0`. Each file is
  `{"images": [[64 integers 0..16], ...], "labels": [0..9, ...]}`.
- `.cache/models/digits/digits-mlp.onnx`: a 64-32-10 ReLU MLP, untrained:
  `images` FLOAT [N, 64] (pixels already divided by 16) -> MatMul W1 [64, 32] -> Add b1
  -> Relu -> MatMul W2 [32, 10] -> Add b2 -> `logits` FLOAT [N, 10]. Only MatMul, Add
  and Relu: the host trains through these (Gemm and Constant build CPU tensors in
  candle-onnx, which breaks on CUDA), and no Softmax (the loss takes logits).
  Initializers W1, b1, W2, b2 (float32); W Kaiming-uniform from
  `numpy.random.default_rng(0)`, b zero. Opset 17, IR version 8.

Deterministic: the same files every run. When onnxruntime is importable it checks that
the model loads and scores about 10% (chance) on the test set; the result goes to stderr.
"""

import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HIDDEN = 32
CLASSES = 10
FEATURES = 64
OPSET = 17
IR_VERSION = 8


def say(message):
    print(f"make_digits: {message}", file=sys.stderr)


def write_atomically(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as out:
        out.write(data)
    os.replace(path + ".part", path)


def split():
    digits = load_digits()
    images = digits.data.astype(np.int64)
    labels = digits.target.astype(np.int64)
    assert images.shape[1] == FEATURES and images.min() >= 0 and images.max() <= 16
    return train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)


def dataset_json(images, labels):
    body = {"images": images.tolist(), "labels": labels.tolist()}
    return json.dumps(body, separators=(",", ":")).encode()


def kaiming_uniform(rng, fan_in, fan_out):
    # He et al. for ReLU: Var(W) = 2 / fan_in, so U(-sqrt(6 / fan_in), sqrt(6 / fan_in)).
    bound = np.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=(fan_in, fan_out)).astype(np.float32)


def mlp():
    rng = np.random.default_rng(0)
    weights = {
        "W1": kaiming_uniform(rng, FEATURES, HIDDEN),
        "b1": np.zeros(HIDDEN, dtype=np.float32),
        "W2": kaiming_uniform(rng, HIDDEN, CLASSES),
        "b2": np.zeros(CLASSES, dtype=np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["images", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["z1"], name="fc1_bias"),
        helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["logits"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits-mlp",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = helper.make_model(
        graph,
        producer_name="lepton-make-digits",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def check_with_onnxruntime(model_path, images, labels):
    try:
        import onnxruntime
    except ImportError:
        say("onnxruntime is not installed; not checking the model")
        return
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.astype(np.float32) / 16.0})
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    say(f"onnxruntime {onnxruntime.__version__} runs the untrained model: "
        f"test accuracy {accuracy:.3f} (chance is 0.1)")
    if not 0.0 <= accuracy < 0.35:
        raise SystemExit(f"make_digits: an untrained model should be near chance, got {accuracy}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the repository root (default: .)")
    args = parser.parse_args()

    data_dir = os.path.join(args.root, ".cache", "data", "digits")
    model_path = os.path.join(args.root, ".cache", "models", "digits", "digits-mlp.onnx")

    train_x, test_x, train_y, test_y = split()
    write_atomically(os.path.join(data_dir, "train.json"), dataset_json(train_x, train_y))
    write_atomically(os.path.join(data_dir, "test.json"), dataset_json(test_x, test_y))
    say(f"wrote {len(train_y)} training and {len(test_y)} test digits into {data_dir}")

    write_atomically(model_path, mlp().SerializeToString())
    say(f"wrote the untrained {FEATURES}-{HIDDEN}-{CLASSES} MLP to {model_path}")
    check_with_onnxruntime(model_path, test_x, test_y)


if __name__ == "__main__":
    main()

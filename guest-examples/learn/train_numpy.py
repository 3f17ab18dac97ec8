"""The numpy baseline for the `digits` trainer: the same training, on the CPU, in numpy.

    .cache/venv/bin/python guest-examples/learn/train_numpy.py --steps 300 --batch 32

Trains the 64-32-10 ReLU MLP of `make_digits.py`, starting from the weights in
`.cache/models/digits/digits-mlp.onnx`, with the manifest's `[trainer.digits]`
settings: softmax cross-entropy on the logits, AdamW, float32 throughout. Step `i`
(from 0) trains on rows `i*batch .. i*batch+batch` of `.cache/data/digits/train.json`,
wrapping around at the end: the file's order, which is already shuffled, so a client
of `POST /learn` can send exactly the same batches. Pixels are divided by 16, as the
`learn` guest does.

Ten warm-up steps run first on a throwaway copy of the weights; then `--steps` steps
from the initial weights are timed. Prints one line on stdout:

    numpy: <mean microseconds per step> us/step over <steps> steps, final loss <f>, test accuracy <a>

`final loss` is the last step's loss before its update (what the trainer's `step`
returns), `test accuracy` that of the trained weights on `test.json`. `--verbose`
adds the loss every 50 steps on stderr.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

# AdamW as candle-nn 0.11's `AdamW` applies it (candle-nn/src/optim.rs): the
# betas, eps and weight decay are `ParamsAdamW::default()`'s (0.9, 0.999, 1e-8, 0.01);
# only the learning rate differs (default 1e-3; the manifest sets 1e-2). Weight
# decay is decoupled (theta *= 1 - lr * weight_decay) and applies to biases too.
LR = 1e-2
BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8
WEIGHT_DECAY = 0.01

WARMUP_STEPS = 10
PARAMS = ("W1", "b1", "W2", "b2")
MAX_PIXEL = 16.0


def load_weights(path):
    model = onnx.load(path)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    missing = [name for name in PARAMS if name not in weights]
    if missing:
        raise SystemExit(f"train_numpy: {path} has no initializers {missing}")
    return {name: weights[name].astype(np.float32, copy=True) for name in PARAMS}


def load_split(path):
    with open(path) as f:
        data = json.load(f)
    images = np.asarray(data["images"], dtype=np.float32) / np.float32(MAX_PIXEL)
    labels = np.asarray(data["labels"], dtype=np.int64)
    return images, labels


def forward(params, x):
    z1 = x @ params["W1"] + params["b1"]
    a1 = np.maximum(z1, np.float32(0))
    logits = a1 @ params["W2"] + params["b2"]
    return z1, a1, logits


def cross_entropy(logits, labels):
    """The mean softmax cross-entropy and the softmax probabilities."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    log_probs = shifted - np.log(sum_exp)
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return loss, exp / sum_exp


class AdamW:
    def __init__(self, params):
        self.t = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}

    def update(self, params, grads):
        self.t += 1
        scale_m = np.float32(1.0 / (1.0 - BETA1**self.t))
        scale_v = np.float32(1.0 / (1.0 - BETA2**self.t))
        decay = np.float32(1.0 - LR * WEIGHT_DECAY)
        for name, g in grads.items():
            m = self.m[name] = np.float32(BETA1) * self.m[name] + np.float32(1 - BETA1) * g
            v = self.v[name] = np.float32(BETA2) * self.v[name] + np.float32(1 - BETA2) * (g * g)
            step = (m * scale_m) / (np.sqrt(v * scale_v) + np.float32(EPS))
            params[name] = params[name] * decay - np.float32(LR) * step


def train_step(params, optimizer, x, y):
    """One AdamW step on a batch; returns the loss before the update."""
    z1, a1, logits = forward(params, x)
    loss, probs = cross_entropy(logits, y)
    dlogits = probs
    dlogits[np.arange(len(y)), y] -= np.float32(1)
    dlogits /= np.float32(len(y))
    dz1 = (dlogits @ params["W2"].T) * (z1 > 0)
    grads = {
        "W2": a1.T @ dlogits,
        "b2": dlogits.sum(axis=0),
        "W1": x.T @ dz1,
        "b1": dz1.sum(axis=0),
    }
    optimizer.update(params, grads)
    return float(loss)


def batch(images, labels, step, size):
    rows = (np.arange(size) + step * size) % len(labels)
    return images[rows], labels[rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed training steps (default 300)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--root", default=".", help="the repository root (default: .)")
    parser.add_argument("--verbose", action="store_true", help="the loss every 50 steps, on stderr")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")

    cache = os.path.join(args.root, ".cache")
    initial = load_weights(os.path.join(cache, "models", "digits", "digits-mlp.onnx"))
    train_x, train_y = load_split(os.path.join(cache, "data", "digits", "train.json"))
    test_x, test_y = load_split(os.path.join(cache, "data", "digits", "test.json"))
    batches = [batch(train_x, train_y, i, args.batch) for i in range(args.steps)]

    scratch = {name: p.copy() for name, p in initial.items()}
    scratch_optimizer = AdamW(scratch)
    for i in range(WARMUP_STEPS):
        train_step(scratch, scratch_optimizer, *batches[i % len(batches)])

    params = {name: p.copy() for name, p in initial.items()}
    optimizer = AdamW(params)
    losses = []
    start = time.perf_counter()
    for x, y in batches:
        losses.append(train_step(params, optimizer, x, y))
    elapsed = time.perf_counter() - start

    if args.verbose:
        for i in range(0, args.steps, 50):
            print(f"train_numpy: step {i + 1}: loss {losses[i]:.4f}", file=sys.stderr)
    _, _, logits = forward(params, test_x)
    accuracy = float((logits.argmax(axis=1) == test_y).mean())
    print(
        f"numpy: {elapsed / args.steps * 1e6:.1f} us/step over {args.steps} steps, "
        f"final loss {losses[-1]:.4f}, test accuracy {accuracy:.4f}"
    )


if __name__ == "__main__":
    main()

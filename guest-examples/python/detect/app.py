"""`detect` in Python: Magika over wasi:nn, answering what the Rust `detect` does.

`POST` the file as the body; `?mode=high-confidence|medium-confidence|best-guess`.
The manifest grants the model as `magika` and its directory (`config.min.json`,
`content_types_kb.min.json`) at `/magika`.
"""

import json

from lepton import http, nn
from lepton.http import IncomingHandler  # noqa: F401  (the component's export)

_SPACE = b" \t\n\x0b\x0c\r"
_MODES = ("high-confidence", "medium-confidence", "best-guess")


def _config() -> dict:
    with open("/magika/config.min.json", "rb") as f:
        config = json.load(f)
    supported = (
        config["mid_size"] == 0
        and not config["use_inputs_at_offsets"]
        and config["beg_size"] < config["block_size"]
        and config["end_size"] < config["block_size"]
        and 1 <= config["min_file_size_for_dl"] <= config["beg_size"]
        and config["target_labels_space"]
    )
    if not supported:
        raise ValueError("unsupported magika config")
    return config


def _without_model(label: str) -> dict:
    return {"label": label, "dl_label": "undefined", "score": 1.0}


def _few_bytes(content: bytes) -> dict:
    try:
        content.decode("utf-8")
        return _without_model("txt")
    except UnicodeDecodeError:
        return _without_model("unknown")


def _features(content: bytes, config: dict):
    """The model's input row, or a verdict reached without it."""
    if not content:
        return _without_model("empty")
    if len(content) < config["min_file_size_for_dl"]:
        return _few_bytes(content)
    block = min(config["block_size"], len(content))
    first = content[:block]
    beg = first.lstrip(_SPACE)[: config["beg_size"]]
    last = content[len(content) - block :]
    end = last.rstrip(_SPACE)
    end = end[len(end) - min(len(end), config["end_size"]) :]
    if len(beg) < config["min_file_size_for_dl"]:
        return _few_bytes(first)
    pad = config["padding_token"]
    row = list(beg) + [pad] * (config["beg_size"] - len(beg))
    row += [pad] * (config["end_size"] - len(end)) + list(end)
    return row


def _decide(config: dict, mode: str, probabilities) -> dict:
    labels = config["target_labels_space"]
    if len(probabilities) != len(labels):
        raise ValueError(f"the model gave {len(probabilities)} probabilities for {len(labels)} labels")
    best = 0
    for i, p in enumerate(probabilities):
        if p > probabilities[best]:
            best = i
    score = probabilities[best]
    dl_label = labels[best]
    label = config["overwrite_map"].get(dl_label, dl_label)
    if mode == "medium-confidence":
        threshold = config["medium_confidence_threshold"]
    else:
        threshold = config["thresholds"].get(dl_label, config["medium_confidence_threshold"])
    if mode != "best-guess" and score < threshold:
        with open("/magika/content_types_kb.min.json", "rb") as f:
            table = json.load(f)
        label = "txt" if table[label]["is_text"] else "unknown"
    return {"label": label, "dl_label": dl_label, "score": score}


@http.handler
def detect(request: http.Request) -> http.Response:
    if request.method != "POST":
        return http.Response(405, [("allow", b"POST")], b"use POST with the file as the body\n")
    mode = request.params().get("mode", "high-confidence")
    if mode not in _MODES:
        return http.Response.text(400, "`mode` must be high-confidence, medium-confidence or best-guess\n")
    config = _config()
    row = _features(request.body, config)
    if isinstance(row, dict):
        return http.Response.json(200, row)
    graph = nn.Graph.load_by_name("magika")
    outputs = graph.compute({"bytes": nn.Tensor.from_i32([1, len(row)], row)})
    return http.Response.json(200, _decide(config, mode, outputs["target_label"].to_f32()))

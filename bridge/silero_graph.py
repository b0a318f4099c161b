"""Silero VAD's graph rebuilt so that a scan's round of windows is one model run.

The exported model takes one window per stream and call: its convolutions see a batch of a few
rows at a time (ORT's convolution makes a small matrix product per row), and every call pays for
the graph's shape branches. A scan's round holds up to 32 windows of each of up to 16 streams
(``bridge.vad``). Only the LSTM step depends on the window before; what comes before it (the
STFT and the four convolutions, 3 x 4 and then 2 and 1 frames long) is the same function of each
window. So the windows of a round go through those as a few matrix products over every window at
once, each convolution written out as the matrix it is on frames this short; then one LSTM runs
over the round's windows, as a sequence per stream, from each stream's state; then the model's
own head (ReLU, a 1 x 1 convolution, a sigmoid). Measured with ``bench/bench_vad.py``.

The weights are read from the model file (the branch for the rate asked), and ``build`` checks the
rebuilt graph against the original on noise before it is used (``SileroModel``); a model whose
graph is not Silero v5's as read here is run as exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class UnknownGraph(ValueError):
    """The model's graph is not laid out as this module reads it."""


@dataclass(frozen=True)
class Dims:
    """The sizes the rebuilt graph is laid out by: a window's samples (context included), the STFT's
    right padding (reflected), hop and frames, its frequency bins, and the LSTM's width."""

    window: int
    pad: int
    hop: int
    frames: int
    bins: int
    hidden: int


def build(path: Path, rate: int, window: int) -> bytes:
    """The round's model for ``rate`` (8000 or 16000) and windows of ``window`` samples, serialized:
    inputs ``windows`` (windows x streams x samples) and ``state`` (2 x streams x 128); outputs
    ``probs`` (windows x streams) and ``state_out``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    branch = _branch(model, rate)
    consts = {n.output[0].rsplit("__", 1)[-1]: numpy_helper.to_array(n.attribute[0].t)
              for n in branch.node if n.op_type == "Constant"}
    convs = [n for n in branch.node if n.op_type == "Conv"]
    if len(convs) != 6:
        raise UnknownGraph(f"{len(convs)} convolutions in the {rate} Hz branch, not Silero v5's 6")
    dims = _dims(consts, convs, window)
    tensors = [numpy_helper.from_array(np.ascontiguousarray(v, np.float32), k)
               for k, v in _weights(consts, convs, dims).items()]
    tensors += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in _shapes(dims).items()]
    floats = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        _nodes(helper.make_node, dims.hidden, _opset(model)), "silero_rounds",
        [helper.make_tensor_value_info("windows", floats, ["windows", "streams", window]),
         helper.make_tensor_value_info("state", floats, [2, "streams", dims.hidden])],
        [helper.make_tensor_value_info("probs", floats, ["windows", "streams"]),
         helper.make_tensor_value_info("state_out", floats, [2, "streams", dims.hidden])],
        initializer=tensors)
    rebuilt = helper.make_model(graph, opset_imports=list(model.opset_import))
    rebuilt.ir_version = model.ir_version
    onnx.checker.check_model(rebuilt)
    return bytes(rebuilt.SerializeToString())


def _dims(consts: dict[str, np.ndarray], convs: list[Any], window: int) -> Dims:
    basis = _weight(consts, "stft.forward_basis_buffer")  # (2 x bins, 1, filter)
    hop, filt = _ints(convs[0], "strides")[0], basis.shape[2]
    pad = int(_weight(consts, "/stft/padding/Constant_1_output_0")[-1])  # reflected on the right
    if filt != 2 * hop or (window + pad) % hop:
        raise UnknownGraph("the STFT's frames are not two hops long")
    return Dims(window=window, pad=pad, hop=hop, frames=(window + pad - filt) // hop + 1, bins=basis.shape[0] // 2,
                hidden=_weight(consts, "decoder.rnn.weight_hh").shape[1])


def _weights(consts: dict[str, np.ndarray], convs: list[Any], dims: Dims) -> dict[str, np.ndarray]:
    """The model's weights as the rebuilt graph uses them: the STFT basis, each convolution as a
    matrix and a bias, the LSTM's in ONNX's gate order, the head."""
    weights = {"basis": _weight(consts, "stft.forward_basis_buffer")[:, 0, :].T.copy()}
    length, layout = dims.frames, "time_major"
    for i, conv in enumerate(convs[1:5]):
        w = _weight(consts, f"encoder.{i}.reparam_conv.weight")
        b = _weight(consts, f"encoder.{i}.reparam_conv.bias")
        matrix, length = _conv_matrix(w, length, _ints(conv, "strides")[0], _ints(conv, "pads")[0], layout)
        weights[f"m{i}"], weights[f"b{i}"] = matrix, np.repeat(b, length)
        layout = "channel_major"
    if length != 1 or weights["m3"].shape[1] != dims.hidden:
        raise UnknownGraph("the encoder does not end in one frame of the LSTM's width")
    weights["W"] = _gates(_weight(consts, "decoder.rnn.weight_ih"))[None]
    weights["R"] = _gates(_weight(consts, "decoder.rnn.weight_hh"))[None]
    weights["B"] = np.concatenate([_gates(_weight(consts, "decoder.rnn.bias_ih")),
                                   _gates(_weight(consts, "decoder.rnn.bias_hh"))])[None]
    weights["head_w"] = _weight(consts, "decoder.decoder.2.weight").reshape(1, dims.hidden).T.copy()
    weights["head_b"] = _weight(consts, "decoder.decoder.2.bias")
    return weights


def _shapes(dims: Dims) -> dict[str, list[int]]:
    """The graph's integer constants: shapes, pads, slice bounds and axes."""
    return {"flat": [-1, dims.window], "pads": [0, 0, 0, dims.pad], "hops": [-1, dims.frames + 1, dims.hop],
            "first": [dims.frames], "later": [dims.frames + 1], "frame_axis": [1],
            "spectrum": [-1, dims.frames * dims.bins], "re": [0], "im": [dims.bins], "end": [2 * dims.bins],
            "last": [-1], "zero": [0], "one": [1], "hidden": [dims.hidden], "halves": [1, 1]}


def _nodes(node: Any, hidden: int, opset: int) -> list[Any]:
    """Windows -> STFT magnitudes -> four convolutions as matrix products (each with its ReLU) ->
    one LSTM over the round -> the head's probabilities, and the state after the round."""
    nodes = [
        node("Shape", ["windows"], ["rounds"], start=0, end=2),
        node("Reshape", ["windows", "flat"], ["rows"]),
        node("Pad", ["rows", "pads"], ["padded"], mode="reflect"),
        node("Reshape", ["padded", "hops"], ["hopped"]),  # a frame is two hops: this one and the next
        node("Slice", ["hopped", "zero", "first", "frame_axis"], ["heads"]),
        node("Slice", ["hopped", "one", "later", "frame_axis"], ["tails"]),
        node("Concat", ["heads", "tails"], ["framed"], axis=2),  # rows x frames x filter
        node("MatMul", ["framed", "basis"], ["stft"]),
        node("Slice", ["stft", "re", "im", "last"], ["real"]),
        node("Slice", ["stft", "im", "end", "last"], ["imag"]),
        node("Mul", ["real", "real"], ["real2"]),
        node("Mul", ["imag", "imag"], ["imag2"]),
        node("Add", ["real2", "imag2"], ["power"]),
        node("Sqrt", ["power"], ["magnitude"]),
        node("Reshape", ["magnitude", "spectrum"], ["x0"]),
    ]
    for i in range(4):
        nodes += [node("MatMul", [f"x{i}", f"m{i}"], [f"y{i}"]), node("Add", [f"y{i}", f"b{i}"], [f"z{i}"]),
                  node("Relu", [f"z{i}"], [f"x{i + 1}"])]
    return nodes + [
        node("Concat", ["rounds", "hidden"], ["sequence_shape"], axis=0),
        node("Reshape", ["x4", "sequence_shape"], ["sequence"]),
        node("Split", ["state"], ["h0", "c0"], axis=0, num_outputs=2) if opset >= 18
        else node("Split", ["state", "halves"], ["h0", "c0"], axis=0),
        node("LSTM", ["sequence", "W", "R", "B", "", "h0", "c0"], ["Y", "h1", "c1"], hidden_size=hidden),
        node("Squeeze", ["Y", "one"], ["outputs"]),
        node("Relu", ["outputs"], ["relu"]),
        node("MatMul", ["relu", "head_w"], ["logit0"]),
        node("Add", ["logit0", "head_b"], ["logit"]),
        node("Sigmoid", ["logit"], ["p"]),
        node("Squeeze", ["p", "last"], ["probs"]),
        node("Concat", ["h1", "c1"], ["state_out"], axis=0),
    ]


def _branch(model: Any, rate: int) -> Any:
    """The If branch that runs at ``rate``: the model compares ``sr`` with 16000."""
    top = [n for n in model.graph.node if n.op_type == "If"]
    if len(top) != 1:
        raise UnknownGraph("Silero v5 branches once on the sample rate")
    branches = {a.name: a.g for a in top[0].attribute}
    return branches["then_branch" if rate == 16000 else "else_branch"]


def _weight(consts: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in consts:
        raise UnknownGraph(f"no {name} in the model")
    return consts[name]


def _ints(node: Any, name: str) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), [1])


def _opset(model: Any) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _conv_matrix(w: np.ndarray, length: int, stride: int, pad: int, layout: str) -> tuple[np.ndarray, int]:
    """A 1-d convolution on ``length`` frames as a matrix: input (time-major: frame x channel, or
    channel-major) to output (channel-major), and the output's length."""
    out_ch, in_ch, kernel = w.shape
    out_len = (length + 2 * pad - kernel) // stride + 1
    matrix = np.zeros((in_ch * length, out_ch * out_len), np.float32)
    for t in range(out_len):
        for k in range(kernel):
            s = t * stride - pad + k
            if 0 <= s < length:
                rows = np.arange(in_ch) * length + s if layout == "channel_major" else s * in_ch + np.arange(in_ch)
                matrix[np.ix_(rows, np.arange(out_ch) * out_len + t)] = w[:, :, k].T
    return matrix, out_len


def _gates(x: np.ndarray) -> np.ndarray:
    """PyTorch's LSTM gate order (input, forget, cell, output) as ONNX's (input, output, forget, cell)."""
    i, f, g, o = np.split(x, 4, axis=0)
    return np.concatenate([i, o, f, g], axis=0)

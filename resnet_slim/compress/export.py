"""Export to ONNX, check the file against PyTorch on real data (parity), count its MACs."""

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.params import max_export_opset

INPUT_NAME, OUTPUT_NAME = "input", "logits"
_CPP_FRAME = re.compile(r"/onnxruntime_src/\S+:\d+ \S+\(.*?\) ")


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int, opset: int) -> None:
    """Write an ONNX model with a dynamic batch axis, named input/output, checked by onnx."""
    max_opset = max_export_opset()
    if max_opset is not None and opset > max_opset:  # torch would dump its whole graph to stderr
        raise UserError(
            f"export.opset {opset} is newer than this torch can export (at most {max_opset})"
        )
    model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the TorchScript exporter is the one that emits QuantizeLinear /
        # DequantizeLinear for fake-quant modules, so FP32 and QAT models share one path.
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
        )
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
            raise UserError(
                f"{path}: the exported ONNX graph is invalid (opset {opset}): {first}"
            ) from None


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor name -> shape (symbolic dims such as the batch count as 1)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {init.name: list(init.dims) for init in inferred.graph.initializer}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    return shapes


def count_macs(path: str | Path) -> int:
    """Multiply-accumulates of one image: Conv, Gemm and MatMul, float, QDQ or integer
    (QLinearConv; ConvInteger / MatMulInteger from dynamic quantization).

    The project's one MAC count (count_macs_params below counts a PyTorch model's export): each
    conv / linear output costs Cin/groups x kH x kW (or in_features) MACs. Biases, BN, ReLU,
    pooling and residual adds are not counted; torch-pruning's counter adds those
    (tests/test_roofline.py), so its numbers for a ResNet are ~0.3% higher.
    """
    model = onnx.load(str(path))
    shapes = _shapes(model)
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "QLinearConv", "ConvInteger"):
            weight = shapes.get(node.input[3 if node.op_type == "QLinearConv" else 1])
            out = shapes.get(node.output[0])
            if weight and out:
                macs += int(np.prod(out)) * int(np.prod(weight[1:]))  # each output: Cin/g * kH * kW
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                macs += int(np.prod(out)) * int(a[-1])
    return macs


# Ops that repeat or choose subgraphs at run time. A feed-forward classifier has none, and one
# Loop of 2**62 iterations would hang every stage that runs the file (ptq, benchmark, serve).
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If", "SequenceMap"})
_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def control_flow_ops(model: onnx.ModelProto) -> list[str]:
    """Sorted op types of `model` that run subgraphs: the control-flow ops, and any node (of any
    domain) with a graph-valued attribute, in the main graph, nested subgraphs and model-local
    functions alike. Walked without recursion, so a deeply nested file cannot overflow it."""
    found = set()
    pending = [list(model.graph.node)] + [list(f.node) for f in model.functions]
    while pending:
        for node in pending.pop():
            subgraphs = [
                graph
                for attribute in node.attribute
                if attribute.type in _SUBGRAPH_TYPES
                for graph in ([attribute.g] if attribute.HasField("g") else [])
                + list(attribute.graphs)
            ]
            if node.op_type in CONTROL_FLOW_OPS or subgraphs:
                found.add(
                    node.op_type
                    if node.domain in ("", "ai.onnx")
                    else f"{node.domain}:{node.op_type}"
                )
            pending += [list(graph.node) for graph in subgraphs]
    return sorted(found)


def _read_graph(path: Path) -> onnx.ModelProto | None:
    """The file's graph without its external weights; None if onnx cannot parse it (onnxruntime
    then says why)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, onnx's own errors, a too-deep nesting, ...
        return None


def make_session(
    path: str | Path,
    *,
    threads: int = 1,
    optimized_model_path: str | Path | None = None,
    image_input: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime CPU session with full graph optimisation and a fixed thread count.

    image_input: check the model takes one NCHW RGB input (off for micro-benchmark graphs).
    A file with control flow (`control_flow_ops`: Loop, Scan, If, ...) is refused before
    onnxruntime loads it: every caller expects a feed-forward classifier (or, for the roofline
    micro-benchmark, a chain of convs), and a loop may not end.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    model = _read_graph(path)
    parsed, ops = model is not None, control_flow_ops(model) if model is not None else []
    del model  # not held while onnxruntime loads its own copy
    if ops:
        raise UserError(
            f"{path}: the graph has control flow ({', '.join(ops[:5])}); a feed-forward "
            f"classifier has none (and a loop may never end), so it is not run"
        )
    options = _session_options(threads, optimized_model_path)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first_line = (
            str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        )
        first_line = _CPP_FRAME.sub("", first_line)  # "/onnxruntime_src/...cc:256 ort::X::X(...) "
        raise UserError(f"{path}: onnxruntime cannot load this model: {first_line}") from None
    if not parsed:  # onnxruntime read what onnx could not: its graph went unchecked
        raise UserError(
            f"{path}: onnxruntime loads this file but onnx cannot parse it, so its graph "
            f"cannot be checked for control flow; re-export it"
        )
    shape = session.get_inputs()[0].shape
    if image_input and (len(shape) != 4 or shape[1] != 3):
        raise UserError(f"{path}: expected one NCHW input with 3 channels, got shape {shape}")
    return session


def _session_options(threads: int, optimized_model_path: str | Path | None) -> ort.SessionOptions:
    """Full graph optimisation, `threads` intra-op threads and one inter-op, sequential, quiet:
    the same settings for every session, so latencies compare."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # parse the file as ONNX, as checked by make_session, whatever its name (never as an
    # ORT-format model)
    options.add_session_config_entry("session.load_model_format", "ONNX")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def check_input_size(session: ort.InferenceSession, image_size: int, path: str | Path) -> None:
    _, _, h, w = session.get_inputs()[0].shape
    if (isinstance(h, int) and h != image_size) or (isinstance(w, int) and w != image_size):
        raise UserError(
            f"{path}: model expects {h}x{w} images but the dataset is {image_size}x{image_size}"
        )


def run_onnx(
    session: ort.InferenceSession, images: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {name: images[i : i + batch_size].numpy()})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The PyTorch model's logits (eval mode, on the CPU) for a tensor of images, in batches."""
    model.eval()
    return torch.cat(
        [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    ).numpy()


def parity(model: nn.Module, session: ort.InferenceSession, images: torch.Tensor) -> dict:
    """Compare PyTorch and onnxruntime logits on the same (normalised) images."""
    reference, logits = torch_logits(model, images), run_onnx(session, images)
    return {
        "max_abs_diff": float(np.abs(reference - logits).max()),
        "top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean()),
        "n_images": int(len(images)),
    }


def check_parity(
    result: dict, *, min_top1_agreement: float, max_abs_diff: float | None
) -> list[str]:
    """The parity problems, if any (an empty list means the export is trusted)."""
    problems = []
    if not result["top1_agreement"] >= min_top1_agreement:
        problems.append(f"top-1 agreement {result['top1_agreement']:.4f} < {min_top1_agreement}")
    if max_abs_diff is not None and not result["max_abs_diff"] <= max_abs_diff:
        problems.append(f"max |logit diff| {result['max_abs_diff']:.3g} > {max_abs_diff}")
    return problems


def count_macs_params(model: nn.Module, image_size: int) -> tuple[int, int]:
    """(multiply-accumulates of one image_size² image, parameter count).

    MACs are counted on the model's ONNX export by export.count_macs, the one MAC count that
    benchmark.json uses too, so a model has the same number in every report (conv and linear
    weights only; torch-pruning's counter also adds BN, ReLU, pooling and biases).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, image_size=image_size, opset=17)  # same count at any opset
        macs = count_macs(path)
    return macs, sum(p.numel() for p in model.parameters())

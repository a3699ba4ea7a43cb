"""How close is a model to this CPU's limit? MACs of an ONNX file (export.count_macs) vs
measured conv throughput.

`conv_peak_gmacs` times chains of 3x3 convolutions (FP32, and INT8 QDQ quantized the same way the
PTQ baseline is) on onnxruntime: a practical per-core ceiling for conv networks on this machine.
A model's floor latency is then MACs / peak; `achieved` is that floor over the measured p50. Small
models sit far below 100% because per-op overhead (kernel dispatch, re-quantization, pooling)
does not shrink with the MAC count.
"""

import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from resnet_slim.compress.export import INPUT_NAME, count_macs, make_session
from resnet_slim.measure.timing import time_ms
from resnet_slim.stats import ratio_of_rounds

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "ConvInteger",
    "MatMulInteger",
}


def is_quantized(ops) -> bool:
    return bool(set(ops or []) & QUANTIZED_OPS)


def _conv_chain(channels: int, size: int, depth: int) -> onnx.ModelProto:
    """`depth` 3x3 conv + ReLU layers at a fixed width: the body of a ResNet stage."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], INPUT_NAME
    for i in range(depth):
        weights.append(
            numpy_helper.from_array(
                (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32), f"w{i}"
            )
        )
        nodes += [
            helper.make_node("Conv", [previous, f"w{i}"], [f"conv{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
        ]
        previous = f"relu{i}"
    shape = ["batch", channels, size, size]
    graph = helper.make_graph(
        nodes,
        "conv_chain",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, shape)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


SHAPES = ((64, 16, 8), (128, 28, 4))  # (channels, size, depth): small and large feature maps


def conv_peak_gmacs(
    *, threads: int = 1, reduce_range: bool = False, runs: int = 30, shapes=SHAPES
) -> dict:
    """Best GMAC/s over conv chains, FP32 and INT8 (QDQ by the same quantizer as the PTQ stage,
    so onnxruntime runs the same fused int8 kernels it runs for the real models)."""
    from resnet_slim.compress.quant import (
        quantize_static_int8,
    )  # onnxruntime.quantization: heavy import

    rng = np.random.default_rng(1)
    result = {"threads": threads, "reduce_range": reduce_range, "shapes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for channels, size, depth in shapes:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(_conv_chain(channels, size, depth), fp32)
            data = np.abs(rng.standard_normal((9, channels, size, size))).astype(np.float32)
            quantize_static_int8(fp32, int8, data[1:], reduce_range=reduce_range, image_input=False)
            macs = channels * channels * 9 * size * size * depth
            row = {
                "shape": f"{depth} x (3x3 conv {channels}->{channels} ch at {size}x{size})",
                "macs": macs,
            }
            for name, path in (("fp32", fp32), ("int8", int8)):
                session = make_session(path, threads=threads, image_input=False)
                feed = {INPUT_NAME: data[:1]}
                median_ms = float(
                    np.median(time_ms(partial(session.run, None, feed), warmup=1, runs=runs))
                )
                row[f"{name}_gmacs"] = macs / median_ms / 1e6
            result["shapes"].append(row)
    for name in ("fp32", "int8"):
        result[f"{name}_gmacs"] = max(row[f"{name}_gmacs"] for row in result["shapes"])
    result["int8_over_fp32"] = result["int8_gmacs"] / result["fp32_gmacs"]
    return result


def efficiency(macs: int, p50_ms: float, peak_gmacs: float) -> dict:
    """The floor latency at the peak, and the achieved fraction of it."""
    floor_ms = macs / (peak_gmacs * 1e6)
    return {
        "macs": int(macs),
        "gmacs_per_s": macs / p50_ms / 1e6,
        "floor_ms": floor_ms,
        "peak_fraction": floor_ms / p50_ms,
    }


def add_efficiency(rows: dict[str, dict], *, threads: int, reduce_range: bool) -> dict:
    """Measure this CPU's conv peak and add each onnxruntime row's `efficiency` against the peak
    of its kind (int8 for quantized files, else fp32). Returns the peak record."""
    peak = conv_peak_gmacs(threads=threads, reduce_range=reduce_range)
    for row in rows.values():
        if row.get("runtime") == "onnxruntime":
            kind = "int8" if is_quantized(row.get("onnx_ops")) else "fp32"
            row.update(
                efficiency(count_macs(row["file"]), row["p50_ms"], peak[f"{kind}_gmacs"]),
                peak_kind=kind,
            )
            if row.get("round_p50_ms"):  # the fraction per round: floor / that round's median
                rounds = row["round_p50_ms"]
                fraction = ratio_of_rounds([row["floor_ms"]] * len(rounds), rounds)
                row["peak_fraction_ci"] = [fraction["ci_low"], fraction["ci_high"]]
    return peak

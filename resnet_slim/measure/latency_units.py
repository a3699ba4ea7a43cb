"""The graphs the latency table times: each ResNet unit (stem, residual block at a given inner
width, head) as a small torch module with random weights, the boundary probes, and their ONNX
export, INT8 QDQ quantization and sessions, made as the pipeline makes its own files (same opset,
same quantizer). resnet_slim/measure/latency_table.py times them.
"""

import copy
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from resnet_slim.compress.export import INPUT_NAME, OUTPUT_NAME, export_onnx, make_session
from resnet_slim.compress.latency_model import RUNTIMES, unit_key
from resnet_slim.errors import UserError
from resnet_slim.train.architectures import option_a_shortcut

OPSET = 17  # params.yaml export.opset: the graphs must be the ones the pipeline ships
CALIBRATION_IMAGES = 8


def _random_bn(channels: int) -> nn.BatchNorm2d:
    # non-trivial statistics, so the folded conv has a bias as in a trained model
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    return bn


def _stem_module(spec: dict) -> nn.Module:
    kernel = spec["kernel"]
    conv = nn.Conv2d(spec["in"], spec["out"], kernel, spec["stride"], kernel // 2, bias=False)
    layers = [conv, _random_bn(spec["out"]), nn.ReLU()]
    if spec["maxpool"]:
        layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return nn.Sequential(*layers)


def _shortcut_module(spec: dict) -> nn.Module | None:
    cin, cout, stride = spec["in"], spec["out"], spec["stride"]
    if spec["shortcut"] == "none":
        if cin != cout or stride != 1:
            raise UserError(f"{unit_key(spec)}: a block without shortcut keeps its shape")
        return None
    if spec["shortcut"] == "option_a":
        if cout == 2 * cin and stride == 2:
            return option_a_shortcut(cin)  # the model's own fixed 0/1 weights
        conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        return nn.Sequential(conv, nn.ReLU())
    if spec["shortcut"] == "conv_bn":
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _random_bn(cout))
    raise UserError(f"unknown block shortcut {spec['shortcut']!r}")


def _basic_module(spec: dict) -> BasicBlock:
    """torchvision's BasicBlock with conv1 -> `mid` channels (what channel pruning leaves)."""
    cin, mid, cout, stride = spec["in"], spec["mid"], spec["out"], spec["stride"]
    block = BasicBlock(cin, cout, stride, _shortcut_module(spec))
    block.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
    block.bn1 = _random_bn(mid)
    block.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
    block.bn2 = _random_bn(cout)
    return block


def _head_module(spec: dict) -> nn.Module:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), nn.Linear(spec["in"], spec["classes"])
    )


def unit_module(spec: dict) -> nn.Module:
    """One unit as the conv / BN / ReLU / add structure it has inside the model."""
    builders = {"stem": _stem_module, "basic": _basic_module, "head": _head_module}
    if spec["kind"] not in builders:
        raise UserError(f"unknown latency unit kind {spec['kind']!r}")
    return builders[spec["kind"]](spec)


def input_shape(spec: dict) -> tuple[int, ...]:
    """The unit's batch-1 input shape."""
    return (1, spec["in"], spec["size"], spec["size"])


def keeps_shape(spec: dict) -> bool:
    """A block whose output can feed a copy of itself: timed as a chain (slope)."""
    return spec["kind"] == "basic" and spec["in"] == spec["out"] and spec["stride"] == 1


def output_shape(spec: dict) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(unit_module(spec).eval()(torch.zeros(input_shape(spec))).shape)


def probe_key(shape: tuple[int, ...]) -> str:
    return "boundary " + "x".join(str(d) for d in shape[1:])


def probe_module(shape: tuple[int, ...], length: int) -> nn.Module:
    """A chain of `length` cheap shape-keeping layers (1x1 conv + ReLU on feature maps, Linear
    on logits): its intercept over lengths is the cost of the graph's input and output."""
    channels = shape[1]
    if len(shape) == 2:
        return nn.Sequential(*[nn.Linear(channels, channels) for _ in range(length)])
    layers = [m for _ in range(length) for m in (nn.Conv2d(channels, channels, 1), nn.ReLU())]
    return nn.Sequential(*layers)


def export_module(module: nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    """ONNX export with a dynamic batch axis, as export_onnx writes the pipeline's models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module.eval(),
            (torch.zeros(shape),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
        )


def calibration_data(shape: tuple[int, ...], *, image: bool, seed: int) -> np.ndarray:
    """Random calibration inputs: normalised-image-like for an image, >= 0 (a ReLU output)
    elsewhere, so the activation zero points are the model's (0 after a ReLU)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((CALIBRATION_IMAGES, *shape[1:])).astype(np.float32)
    return data if image else np.abs(data)


def build_graph(
    module: nn.Module, shape: tuple[int, ...], folder: Path, *, reduce_range: bool, seed: int
) -> dict:
    """Export `module` (FP32) and quantize it (INT8 QDQ); {"paths": {runtime: file}, "shape"}."""
    from resnet_slim.compress.quant import quantize_static_int8  # onnxruntime.quantization: heavy

    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    export_module(module, fp32, shape)
    image = len(shape) == 4 and shape[1] == 3
    calibration = calibration_data(shape, image=image, seed=seed)
    quantize_static_int8(fp32, int8, calibration, reduce_range=reduce_range, image_input=image)
    return {"paths": {"fp32": fp32, "int8": int8}, "shape": shape}


def open_graph(graph: dict, *, threads: int, seed: int) -> dict:
    """{runtime: a call running the graph once on a fixed input}."""
    shape = graph["shape"]
    image = len(shape) == 4 and shape[1] == 3
    feed = {INPUT_NAME: calibration_data(shape, image=image, seed=seed)[:1]}
    calls = {}
    for runtime, path in graph["paths"].items():
        session = make_session(path, threads=threads, image_input=False)
        calls[runtime] = partial(session.run, None, feed)
    return calls


def entry_module(spec: dict) -> nn.Module:
    """What feeds a unit inside a model: a conv (1x1 + ReLU, a probe layer), except for the
    stem, fed the image. Without it the unit would read the graph's input, and onnxruntime then
    lays the graph out otherwise: FP32 keeps the residual stream in NCHW and no longer fuses the
    add into conv2 (measured: 17 % too slow a prediction for mid-8 blocks)."""
    return nn.Identity() if spec["kind"] == "stem" else probe_module(input_shape(spec), 1)


def chain_module(spec: dict, length: int) -> nn.Module:
    """The entry layer, then `length` copies of the unit (the entry cancels in the slope)."""
    return nn.Sequential(entry_module(spec), *[unit_module(spec) for _ in range(length)])


def open_model(
    model: nn.Module,
    image_size: int,
    folder: Path,
    *,
    runtime: str,
    threads: int = 1,
    reduce_range: bool = False,
    seed: int = 0,
):
    """A call running a whole model once, exported (and for INT8 quantized, with random
    calibration images) the way its units are."""
    from resnet_slim.compress.quant import quantize_static_int8

    if runtime not in RUNTIMES:
        raise UserError(f"latency runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    export_onnx(copy.deepcopy(model), fp32, image_size=image_size, opset=OPSET)
    images = calibration_data((1, 3, image_size, image_size), image=True, seed=seed)
    path = fp32
    if runtime == "int8":
        path = folder / "model.int8.onnx"
        quantize_static_int8(fp32, path, images, reduce_range=reduce_range)
    session = make_session(path, threads=threads)
    return partial(session.run, None, {INPUT_NAME: images[:1]})

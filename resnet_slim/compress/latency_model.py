"""A ResNet as a list of latency "units", and its latency predicted from a table of measured
per-unit costs (resnet_slim/measure/latency_table.py builds the table; nothing here times).

Why measured, not counted: at these sizes per-operator cost dominates and onnxruntime's fast INT8
conv only runs for some channel counts (in % 4 == 0, out % 8 (AVX2) / % 4 (AVX-512), out >= 16),
so removing MACs often removes no milliseconds. The pruner picks per-block widths and whole
blocks to remove by the sum of measured unit costs instead.

A unit is a plain dict ("spec"), JSON-able:
- {"kind": "stem", "in": 3, "out": C, "kernel": k, "stride": s, "maxpool": bool, "size": H_in}
- {"kind": "basic", "in": Cin, "mid": Cmid, "out": Cout, "stride": s,
   "shortcut": "none" | "option_a" | "conv_bn", "size": H_in}  (+ "name": the block's module)
- {"kind": "head", "in": C, "classes": K, "size": H_in}
A model's latency is the sum of its units' costs plus the table's per-model constant (the
session call, the input's quantization and the logits' dequantization).
"""

from collections.abc import Callable

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_slim.errors import UserError

RUNTIMES = ("int8", "fp32")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def unit_key(spec: dict) -> str:
    """The table key of a unit: every field that changes its cost, in a fixed order (never the
    block's module name: equal blocks of different models share one measurement)."""
    kind = spec["kind"]
    if kind == "stem":
        pool = "yes" if spec["maxpool"] else "no"
        return (
            f"stem in={spec['in']} out={spec['out']} k={spec['kernel']} s={spec['stride']} "
            f"pool={pool} h={spec['size']}"
        )
    if kind == "basic":
        return (
            f"basic in={spec['in']} mid={spec['mid']} out={spec['out']} s={spec['stride']} "
            f"sc={spec['shortcut']} h={spec['size']}"
        )
    if kind == "head":
        return f"head in={spec['in']} classes={spec['classes']} h={spec['size']}"
    raise UserError(f"unknown latency unit kind {kind!r} (expected stem, basic or head)")


def conv_output_size(size: int, conv: nn.Conv2d) -> int:
    """Spatial size after `conv` (square inputs), by the usual floor formula."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    padding, dilation = conv.padding[0], conv.dilation[0]
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _maxpool_output_size(size: int, pool: nn.MaxPool2d) -> int:
    kernel = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
    stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    padding = pool.padding if isinstance(pool.padding, int) else pool.padding[0]
    return (size + 2 * padding - kernel) // stride + 1


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UserError(f"latency model: {what}")


def stem_spec(model: nn.Module, image_size: int) -> tuple[dict, int]:
    """(the stem's spec, the spatial size after it)."""
    conv = getattr(model, "conv1", None)
    _require(isinstance(conv, nn.Conv2d), "the model has no conv1 stem (not a ResNet?)")
    pool = getattr(model, "maxpool", None)
    has_pool = isinstance(pool, nn.MaxPool2d)
    _require(has_pool or pool is None or isinstance(pool, nn.Identity), "unknown stem pooling")
    spec = {
        "kind": "stem",
        "in": conv.in_channels,
        "out": conv.out_channels,
        "kernel": conv.kernel_size[0],
        "stride": conv.stride[0],
        "maxpool": has_pool,
        "size": image_size,
    }
    size = conv_output_size(image_size, conv)
    return spec, _maxpool_output_size(size, pool) if has_pool else size


def shortcut_kind(block: BasicBlock, name: str) -> str:
    """ "none", "option_a" (fixed 1x1/2 conv + ReLU, CifarResNet) or "conv_bn" (torchvision)."""
    shortcut = block.downsample
    if shortcut is None:
        return "none"
    parts = list(shortcut) if isinstance(shortcut, nn.Sequential) else []
    if len(parts) == 2 and isinstance(parts[0], nn.Conv2d):
        if isinstance(parts[1], nn.ReLU):
            return "option_a"
        if isinstance(parts[1], nn.BatchNorm2d):
            return "conv_bn"
    raise UserError(f"latency model: {name}.downsample is neither option A nor conv + BN")


def basic_spec(block: BasicBlock, name: str, size: int) -> dict:
    """A BasicBlock's spec, read from its layers (so pruned widths are what they are now)."""
    convs = (block.conv1, block.conv2)
    _require(all(isinstance(c, nn.Conv2d) for c in convs), f"{name}: conv1/conv2 are not convs")
    return {
        "kind": "basic",
        "in": block.conv1.in_channels,
        "mid": block.conv1.out_channels,
        "out": block.conv2.out_channels,
        "stride": block.conv1.stride[0],
        "shortcut": shortcut_kind(block, name),
        "size": size,
        "name": name,
    }


def block_specs(model: nn.Module, size: int) -> tuple[list[dict], int]:
    """(the specs of every residual block, stage by stage, the spatial size after the last)."""
    specs = []
    for stage in STAGES:
        for index, block in getattr(model, stage, nn.Sequential()).named_children():
            name = f"{stage}.{index}"
            if isinstance(block, nn.Identity):  # a removed block left as a placeholder
                continue
            if isinstance(block, Bottleneck):
                raise UserError(
                    f"latency model: {name} is a Bottleneck block; only BasicBlock ResNets "
                    f"(CifarResNet, resnet18/34) have a latency table"
                )
            _require(isinstance(block, BasicBlock), f"{name} is not a residual BasicBlock")
            specs.append(basic_spec(block, name, size))
            size = conv_output_size(size, block.conv1)
    _require(bool(specs), "the model has no residual blocks (layer1..layer4)")
    return specs, size


def head_spec(model: nn.Module, size: int) -> dict:
    classifier = model.get_submodule(getattr(model, "classifier_name", "fc"))
    _require(isinstance(classifier, nn.Linear), "the classifier is not one Linear layer")
    return {
        "kind": "head",
        "in": classifier.in_features,
        "classes": classifier.out_features,
        "size": size,
    }


def model_units(model: nn.Module, image_size: int) -> list[dict]:
    """The ordered unit specs of a BasicBlock ResNet: stem, every block (with its module name
    under "name"), head. Read from the modules, so channel- and depth-pruned models work."""
    stem, size = stem_spec(model, image_size)
    blocks, size = block_specs(model, size)
    return [stem, *blocks, head_spec(model, size)]


def block_spec_at(spec: dict, mid: int) -> dict:
    """The same block at another inner (conv1 output) width."""
    if spec["kind"] != "basic":
        raise UserError(f"only a block's width can change, not a {spec['kind']}'s")
    return {**spec, "mid": int(mid)}


def table_units_for(
    model: nn.Module, image_size: int, widths_for: Callable[[dict], list[int]]
) -> list[dict]:
    """Every unit the pruner may produce from `model`: stem, head, and each block at its current
    width and at every width in widths_for(spec); deduplicated by key, without module names."""
    units: dict[str, dict] = {}
    for spec in model_units(model, image_size):
        variants = [spec]
        if spec["kind"] == "basic":
            variants += [block_spec_at(spec, mid) for mid in widths_for(spec)]
        for variant in variants:
            plain = {k: v for k, v in variant.items() if k != "name"}
            units.setdefault(unit_key(plain), plain)
    return list(units.values())


def unit_ms(spec: dict, table: dict, runtime: str) -> float:
    """One unit's measured cost in a table; a one-line UserError when the table lacks it."""
    key = unit_key(spec)
    row = table.get("units", {}).get(key)
    if row is None or f"{runtime}_ms" not in row:
        raise UserError(
            f"latency table has no unit {key!r}: re-run the latency_table stage for this "
            f"model's widths"
        )
    return float(row[f"{runtime}_ms"])


def predict_ms(specs: list[dict], table: dict, runtime: str) -> float:
    """Predicted batch-1 latency (ms): the units' costs plus the per-model constant."""
    if runtime not in RUNTIMES:
        raise UserError(f"latency runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    constant = float(table["constant_ms"][runtime])
    return constant + sum(unit_ms(spec, table, runtime) for spec in specs)

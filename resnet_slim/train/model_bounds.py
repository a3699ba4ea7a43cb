"""Bounds on architecture records: a checkpoint is untrusted input.

The sizes a record claims (a width, a class count, each layer's channels, the whole model's
parameters and activations) are checked by cheap arithmetic over the layers the builder would
create, before anything is allocated: `check_arch_size`, which `models.build_model` runs first.
"""

from torchvision.models.resnet import Bottleneck

from resnet_slim.errors import UserError
from resnet_slim.limits import MAX_WIDTH
from resnet_slim.train.architectures import ARCHS, CIFAR_DEPTHS, as_count, check_blocks

# A checkpoint is untrusted input: sizes it claims are checked before anything is allocated
# (a claimed width of 200000 would otherwise ask for ~1.4 TB).
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_CHANNELS = MAX_WIDTH * 8 * Bottleneck.expansion  # the widest layer of the widest ResNet allowed
# Values each within their own limit still add up: 8192 channels in every conv of a ResNet-18 is
# ~9.9 G parameters (~39 GB). So the whole model a record describes is bounded too, by cheap
# arithmetic over the layers the builder would create (`arch_size`), before anything is built.
# Parameters: 2 GB of float32 weights; above ResNet-50 at MAX_WIDTH (~384 M) and 20x the largest
# model this pipeline trains (ResNet-50, 25.6 M).
MAX_PARAMS = 500_000_000
# Float32 outputs of every conv / linear layer for ONE image (batch 1) at the data's size:
# ResNet-50 needs ~45 MB at 224 px and ~0.9 GB at MAX_WIDTH and 512 px (the largest images
# allowed). Inference frees most of them as it goes; training keeps about this much per image.
MAX_ACTIVATION_BYTES = 4 * 2**30
# The image size assumed where a caller does not know the data's: each stem's design size
SMALL_INPUT_SIZE, LARGE_INPUT_SIZE = 32, 224


class _Layer:
    """A conv / BN / linear layer the builder creates: its size, not its weights."""

    __slots__ = ("kind", "cin", "cout", "kernel", "groups", "bias", "pixels")

    def __init__(self, kind, cin, cout, *, kernel=1, groups=1, bias=False, pixels=1):
        self.kind, self.cin, self.cout = kind, cin, cout
        self.kernel, self.groups, self.bias, self.pixels = kernel, groups, bias, pixels

    def params(self) -> int:
        if self.kind == "bn":
            return 2 * self.cout  # weight and bias (running statistics are buffers)
        fan_in = -(-self.cin // self.groups) * self.kernel * self.kernel
        return self.cout * fan_in + (self.cout if self.bias else 0)

    def outputs(self) -> int:
        """Elements of this layer's output for one image (BN's are its conv's, not counted)."""
        return 0 if self.kind == "bn" else self.cout * self.pixels


def _shrink(size: int, stride: int) -> int:
    # every conv / pool here pads (k-1)/2 (1x1: none): the output is ceil(size / stride)
    return -(-size // stride)


def _resnet_layers(arch: dict, size: int) -> dict[str, _Layer]:
    """torchvision's ResNet as ResNet.__init__ builds it (block, stem and width from `arch`)."""
    block = ARCHS[arch["name"]][0]
    width, classes = as_count(arch["width"]), as_count(arch["num_classes"])
    small, blocks = arch["small_input"], record_blocks(arch)
    if width is None or classes is None:
        return {}
    expansion = block.expansion
    table = {}
    if small:
        table["conv1"] = _Layer("conv", 3, width, kernel=3, pixels=size * size)
    else:
        size = _shrink(size, 2)  # 7x7/2
        table["conv1"] = _Layer("conv", 3, width, kernel=7, pixels=size * size)
        size = _shrink(size, 2)  # max-pool 3x3/2
    table["bn1"] = _Layer("bn", width, width)
    inplanes = width
    for stage, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2), strict=True), start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(count):
            prefix, step = f"layer{stage}.{index}", stride if index == 0 else 1
            out_size = _shrink(size, step)
            pixels_in, pixels_out = size * size, out_size * out_size
            if block is Bottleneck:  # torchvision v1.5: the stride is on the 3x3 conv
                convs = [
                    (inplanes, planes, 1, pixels_in),
                    (planes, planes, 3, pixels_out),
                    (planes, planes * expansion, 1, pixels_out),
                ]
            else:
                convs = [(inplanes, planes, 3, pixels_out), (planes, planes, 3, pixels_out)]
            for number, (cin, cout, kernel, pixels) in enumerate(convs, start=1):
                table[f"{prefix}.conv{number}"] = _Layer(
                    "conv", cin, cout, kernel=kernel, pixels=pixels
                )
                table[f"{prefix}.bn{number}"] = _Layer("bn", cout, cout)
            if index == 0 and (step != 1 or inplanes != planes * expansion):
                cout = planes * expansion
                table[f"{prefix}.downsample.0"] = _Layer("conv", inplanes, cout, pixels=pixels_out)
                table[f"{prefix}.downsample.1"] = _Layer("bn", cout, cout)
            inplanes, size = planes * expansion, out_size
    table["fc"] = _Layer("linear", inplanes, classes, bias=True)
    return table


def _cifar_layers(arch: dict, size: int) -> dict[str, _Layer]:
    """CifarResNet as its __init__ builds it: three stages, option-A shortcut convs, `linear`."""
    depth, width = as_count(arch["depth"]), as_count(arch["width"])
    classes, blocks = as_count(arch["num_classes"]), record_blocks(arch)
    if depth not in CIFAR_DEPTHS or width is None or classes is None:
        return {}  # CifarResNet / build_model say what is wrong
    table = {
        "conv1": _Layer("conv", 3, width, kernel=3, pixels=size * size),
        "bn1": _Layer("bn", width, width),
    }
    inplanes = width
    for stage, (count, stride) in enumerate(zip(blocks, (1, 2, 2), strict=True), start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(count):
            prefix, step = f"layer{stage}.{index}", stride if index == 0 else 1
            size = _shrink(size, step)
            pixels = size * size
            table[f"{prefix}.conv1"] = _Layer("conv", inplanes, planes, kernel=3, pixels=pixels)
            table[f"{prefix}.bn1"] = _Layer("bn", planes, planes)
            table[f"{prefix}.conv2"] = _Layer("conv", planes, planes, kernel=3, pixels=pixels)
            table[f"{prefix}.bn2"] = _Layer("bn", planes, planes)
            if step != 1:
                table[f"{prefix}.downsample.0"] = _Layer(
                    "conv", inplanes, 2 * inplanes, pixels=pixels
                )
            inplanes = planes
    table["linear"] = _Layer("linear", inplanes, classes, bias=True)
    return table


def record_blocks(arch: dict) -> list[int] | None:
    """Residual blocks per stage of a ResNet record: its `blocks` (left by depth pruning) or, when
    absent or None, the architecture's own counts. None for a record the ResNet builders do not
    take (an unknown name, a bad depth: build_model says what is wrong). A bad `blocks`, or one on
    a network without residual stages, is one UserError."""
    name, blocks = arch.get("name"), arch.get("blocks")
    if name == "cifar_resnet":
        depth = as_count(arch.get("depth"))
        if depth not in CIFAR_DEPTHS:
            return None
        own, what = [(depth - 2) // 6] * 3, f"cifar_resnet of depth {depth}"
    elif isinstance(name, str) and name in ARCHS:
        own, what = ARCHS[name][1], name
    else:
        if blocks is not None and name == "mobilenet_v3_small":
            raise UserError(
                f"bad architecture record: a {name} has no residual stages to keep blocks of, "
                f"yet it records blocks; the checkpoint is corrupt or not from this tool"
            )
        return None
    try:
        return check_blocks(blocks, own, what)
    except UserError as err:
        raise UserError(
            f"bad architecture record: {err}; the checkpoint is corrupt or not from this tool"
        ) from None


def _mobilenet_layers(arch: dict, size: int) -> dict[str, _Layer]:
    """MobileNetV3Small as torchvision builds it (its own configuration table, width-scaled)."""
    from torchvision.models._utils import _make_divisible
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

    width, classes = as_count(arch["width"]), as_count(arch["num_classes"])
    small = arch["small_input"]
    if width is None or classes is None or width < 1:
        return {}
    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width / 16)
    stem = setting[0].input_channels
    size = _shrink(size, 1 if small else 2)
    table = {
        "features.0.0": _Layer("conv", 3, stem, kernel=3, pixels=size * size),
        "features.0.1": _Layer("bn", stem, stem),
    }
    for number, cnf in enumerate(setting, start=1):
        prefix, index = f"features.{number}.block", 0
        cin, mid, cout = cnf.input_channels, cnf.expanded_channels, cnf.out_channels
        if mid != cin:
            table[f"{prefix}.0.0"] = _Layer("conv", cin, mid, pixels=size * size)
            table[f"{prefix}.0.1"] = _Layer("bn", mid, mid)
            index = 1
        stride = 1 if cnf.dilation > 1 or (small and number == 1) else cnf.stride
        size = _shrink(size, stride)
        pixels = size * size
        table[f"{prefix}.{index}.0"] = _Layer(
            "conv", mid, mid, kernel=cnf.kernel, groups=mid, pixels=pixels
        )
        table[f"{prefix}.{index}.1"] = _Layer("bn", mid, mid)
        index += 1
        if cnf.use_se:
            squeeze = _make_divisible(mid // 4, 8)
            table[f"{prefix}.{index}.fc1"] = _Layer("conv", mid, squeeze, bias=True)
            table[f"{prefix}.{index}.fc2"] = _Layer("conv", squeeze, mid, bias=True)
            index += 1
        table[f"{prefix}.{index}.0"] = _Layer("conv", mid, cout, pixels=pixels)
        table[f"{prefix}.{index}.1"] = _Layer("bn", cout, cout)
    last_in = setting[-1].out_channels
    last = f"features.{len(setting) + 1}"
    table[f"{last}.0"] = _Layer("conv", last_in, 6 * last_in, pixels=size * size)
    table[f"{last}.1"] = _Layer("bn", 6 * last_in, 6 * last_in)
    table["classifier.0"] = _Layer("linear", 6 * last_in, last_channel, bias=True)
    table["classifier.3"] = _Layer("linear", last_channel, classes, bias=True)
    return table


def _resized(table: dict[str, _Layer], channels) -> None:
    """Apply a pruned record's channel counts as resize_to_channels does (its malformed entries
    are left for it to refuse)."""
    for name, counts in channels.items() if isinstance(channels, dict) else []:
        layer = table.get(name)
        if layer is None or not isinstance(counts, (list, tuple)) or not counts:
            continue
        if layer.kind == "bn":
            features = as_count(counts[0])
            if features is not None:
                layer.cin = layer.cout = features
        elif len(counts) == 2:
            out, cin = as_count(counts[0]), as_count(counts[1])
            if out is not None and cin is not None:
                layer.cout, layer.cin = out, cin


def _factorized(table: dict[str, _Layer], ranks) -> None:
    """Split layers as factorized_structure does: k x k to `rank`, then 1x1 back."""
    for name, value in ranks.items() if isinstance(ranks, dict) else []:
        layer, rank = table.get(name), as_count(value)
        if layer is None or layer.kind == "bn" or rank is None or layer.groups != 1:
            continue
        del table[name]  # now a Sequential: naming it again is refused by the builder
        table[f"{name}.0"] = _Layer(
            layer.kind, layer.cin, rank, kernel=layer.kernel, pixels=layer.pixels
        )
        table[f"{name}.1"] = _Layer(
            layer.kind, rank, layer.cout, bias=layer.bias, pixels=layer.pixels
        )


def assumed_image_size(arch: dict) -> int:
    """The image size a family is designed for: 32 px with the small-input stem, else 224 px."""
    small = arch.get("name") == "cifar_resnet" or arch.get("small_input") is True
    return SMALL_INPUT_SIZE if small else LARGE_INPUT_SIZE


def _layer_table(arch: dict, image_size: int | None = None) -> dict[str, _Layer]:
    """{name: layer} of every conv / BN / linear `build_model(arch)` creates (empty for a record
    the builders do not take)."""
    if not isinstance(arch, dict):
        return {}
    size = image_size if image_size is not None else assumed_image_size(arch)
    builders = {"cifar_resnet": _cifar_layers, "mobilenet_v3_small": _mobilenet_layers}
    builders.update(dict.fromkeys(ARCHS, _resnet_layers))
    try:
        table = builders[arch["name"]](arch, size)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        return {}  # e.g. an unknown name, a missing key, a tensor where a flag belongs
    _resized(table, arch.get("channels"))
    _factorized(table, arch.get("lowrank"))
    return table


def arch_size(arch: dict, image_size: int | None = None) -> tuple[int, int] | None:
    """(parameters, bytes of float32 conv / linear outputs for one image_size² image) of the model
    `build_model(arch)` would build, from the record alone: nothing is allocated.

    None when the record is not one the builders take (build_model then says what is wrong).
    Without `image_size`, the family's design size (`assumed_image_size`).
    """
    table = _layer_table(arch, image_size)
    if not table:
        return None
    params = sum(layer.params() for layer in table.values())
    return params, 4 * sum(layer.outputs() for layer in table.values())


def check_arch_size(arch: dict, *, image_size: int | None = None) -> None:
    """One UserError if an architecture record claims sizes beyond what any allowed model has:
    one value (a width, a class count, a layer's channels, a stage's blocks) or the whole model
    (its parameter count, its activations for one `image_size` image)."""
    if not isinstance(arch, dict):
        return  # build_model names what is wrong with it
    record_blocks(arch)  # a bad per-stage block count, before it sizes anything
    claims = {
        "width": (arch.get("width"), MAX_WIDTH),
        "num_classes": (arch.get("num_classes"), MAX_CLASSES),
    }
    channels, lowrank = arch.get("channels"), arch.get("lowrank")
    for layer, counts in channels.items() if isinstance(channels, dict) else []:
        if not isinstance(counts, (list, tuple)):  # a set, dict or tensor unpacks to counts too
            raise UserError(
                f"bad architecture record: channels[{layer!r}] is a {type(counts).__name__}, "
                f"not a list of channel counts; the checkpoint is corrupt or not from this tool"
            )
        for i, count in enumerate(counts):
            claims[f"channels[{layer!r}][{i}]"] = (count, MAX_CHANNELS)
    for layer, rank in lowrank.items() if isinstance(lowrank, dict) else []:
        claims[f"lowrank[{layer!r}]"] = (rank, MAX_CHANNELS)
    for key, (value, limit) in claims.items():
        count = as_count(value)
        if count is not None and not 0 < count <= limit:
            raise UserError(
                f"bad architecture record: it claims {key} = {count}, outside "
                f"1..{limit}; the checkpoint is corrupt or not from this tool"
            )
    size = arch_size(arch, image_size)
    if size is None:
        return
    params, activations = size
    name = str(arch.get("name"))[:40]
    if params > MAX_PARAMS:
        raise UserError(
            f"bad architecture record: it describes a {name} with {params / 1e6:,.0f} M "
            f"parameters ({4 * params / 1e9:,.1f} GB of float32 weights), over the "
            f"{MAX_PARAMS / 1e6:,.0f} M this tool builds; the checkpoint is corrupt or not "
            f"from this tool"
        )
    if activations > MAX_ACTIVATION_BYTES:
        pixels = image_size if image_size is not None else assumed_image_size(arch)
        raise UserError(
            f"bad architecture record: its {name}'s layer outputs for one {pixels}x{pixels} "
            f"image take {activations / 1e9:,.1f} GB, over the "
            f"{MAX_ACTIVATION_BYTES / 2**30:g} GiB this tool allows; use a narrower model "
            f"or smaller images"
        )

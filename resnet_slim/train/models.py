"""ResNets built from torchvision's blocks, with the width and the stem as builder arguments.

With `width=64, small_input=False` the module tree and state_dict keys are exactly torchvision's
`resnet18/34/50`, so weights trained elsewhere load unchanged. `CifarResNet` is He et al.'s CIFAR
family (depth 6n+2) with the key names of the common CIFAR checkpoints (conv1, bn1, layer1..3,
linear), so those load unchanged too (resnet_slim/train/model_import.py). A pruned network is the
same architecture plus per-layer channel counts (`arch["channels"]`), so checkpoints never pickle
modules: `build_model(checkpoint["arch"])` rebuilds it and `load_state_dict` fills it.
"""

import operator

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from resnet_slim.errors import UserError
from resnet_slim.limits import MAX_WIDTH

ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNet(nn.Module):
    """torchvision's ResNet (He et al. 2015, arXiv:1512.03385) with stage widths w, 2w, 4w, 8w."""

    classifier_name = "fc"  # the layer whose outputs are the classes (never pruned, replaceable)

    def __init__(
        self,
        block,
        layers: list[int],
        *,
        num_classes: int,
        width: int = 64,
        small_input: bool = False,
    ):
        super().__init__()
        self.inplanes = width
        if small_input:
            # CIFAR-style stem: a 7x7/2 conv plus max-pool would shrink 32 px to 8 px at once.
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer4 (for feature distillation)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last stage's output."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])


def option_a_weight(in_channels: int) -> torch.Tensor:
    """The 1x1 conv weight [2C, C, 1, 1] of He et al.'s parameter-free "option A" shortcut.

    Option A (arXiv:1512.03385, sect. 4.2) subsamples by 2 and zero-pads C channels to 2C, input
    channel i landing on output channel i + C/2. As a fixed 1x1 stride-2 conv, that is a 0/1 matrix:
    the same numbers exactly, but a layer torch-pruning's dependency graph can prune through, so
    removing channels keeps the mapping exact for the channels that remain.
    """
    weight = torch.zeros(2 * in_channels, in_channels, 1, 1)
    index = torch.arange(in_channels)
    weight[index + in_channels // 2, index, 0, 0] = 1.0
    return weight


def option_a_shortcut(in_channels: int) -> nn.Sequential:
    """Fixed 1x1/2 conv (never trained) + ReLU. The ReLU changes nothing (a block's input is a
    ReLU output, so >= 0, and the 0/1 weights keep it >= 0); it makes the pair fusable as
    Conv+ReLU by QAT (resnet_slim/compress/qat.py fuses `downsample.0` with `downsample.1`)."""
    conv = nn.Conv2d(in_channels, 2 * in_channels, kernel_size=1, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(option_a_weight(in_channels))
    conv.weight.requires_grad_(False)
    return nn.Sequential(conv, nn.ReLU(inplace=False))


CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class CifarResNet(ResNet):
    """He et al.'s CIFAR ResNet (arXiv:1512.03385, sect. 4.2): depth 6n+2, a 3x3 stem, three
    stages of n BasicBlocks with width, 2*width, 4*width channels (16/32/64 in the paper), option-A
    shortcuts, global average pooling and `linear`.

    A ResNet subclass so every stage that takes a ResNet (pruning, QAT, distillation) takes it;
    it has three stages, not four. Checkpoints without shortcut weights (the paper's option A has
    no parameters) get the fixed option-A weights filled in when loaded.
    """

    classifier_name = "linear"

    def __init__(self, *, depth: int, num_classes: int, width: int = 16):
        nn.Module.__init__(self)
        if depth not in CIFAR_DEPTHS:
            raise UserError(
                f"cifar_resnet depth must be one of {list(CIFAR_DEPTHS)} (6n+2), got {depth}"
            )
        blocks = (depth - 2) // 6
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, blocks, stride=1)
        self.layer2 = self._make_layer(width * 2, blocks, stride=2)
        self.layer3 = self._make_layer(width * 4, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(width * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.register_load_state_dict_pre_hook(_fill_option_a_weights)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = option_a_shortcut(self.inplanes) if stride != 1 else None
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer3 (for feature distillation)."""
        x = self.relu(self.bn1(self.conv1(x)))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.avgpool(x), 1))


def shortcut_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """{name: conv} of a CifarResNet's fixed option-A shortcut convs (empty for other models)."""
    if not isinstance(model, CifarResNet):
        return {}
    return {
        f"{name}.downsample.0": block.downsample[0]
        for name, block in model.named_modules()
        if isinstance(block, BasicBlock)
        and block.downsample is not None
        and isinstance(block.downsample[0], nn.Conv2d)
    }


def freeze_shortcuts(model: nn.Module) -> None:
    """Mark the option-A shortcut weights as not trainable (again: re-created layers, e.g. by
    pruning or by `resize_to_channels`, come back trainable)."""
    for conv in shortcut_convs(model).values():
        conv.weight.requires_grad_(False)


def _fill_option_a_weights(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    # A checkpoint of the parameter-free option A has no shortcut keys: supply the fixed weights.
    # Only for unpruned shapes; a pruned model's checkpoint always stores its (sliced) weights.
    for name, conv in shortcut_convs(module).items():
        key = f"{prefix}{name}.weight"
        if key not in state_dict and conv.out_channels == 2 * conv.in_channels:
            state_dict[key] = option_a_weight(conv.in_channels)


class MobileNetV3Small(nn.Module):
    """torchvision's mobilenet_v3_small (Howard et al. 2019, arXiv:1905.02244) as a student.

    `width` is the stem's channel count (16 = the standard model; width_mult = width / 16).
    For small inputs the stem and the first block run at stride 1 (a 16 px image would otherwise
    be 4 px after two layers). Stages for feature distillation end where the resolution drops.
    """

    classifier_name = "classifier.3"
    STAGE_ENDS = (1, 3, 8, 12)  # indices into `features`: 16, 24, 48 and 576 channels at width 16

    def __init__(self, *, num_classes: int, width: int = 16, small_input: bool = True):
        super().__init__()
        net = torchvision.models.mobilenet_v3_small(num_classes=num_classes, width_mult=width / 16)
        if small_input:
            net.features[0][0].stride = (1, 1)
            net.features[1].block[0][0].stride = (1, 1)
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.STAGE_ENDS:
                outputs.append(x)
        return outputs

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x)[-1])


STUDENT_ONLY = ("mobilenet_v3_small",)


def make_arch(
    *,
    name: str,
    num_classes: int,
    width: int = 64,
    small_input: bool = True,
    depth: int | None = None,
) -> dict:
    """The plain-data architecture record stored in every checkpoint.

    `cifar_resnet` also records its `depth` (20/32/44/56/110); its stem is always the small one.
    """
    if name == "cifar_resnet":
        if depth not in CIFAR_DEPTHS:
            raise UserError(f"cifar_resnet depth must be one of {list(CIFAR_DEPTHS)}, got {depth}")
        return {
            "name": name,
            "depth": int(depth),
            "num_classes": int(num_classes),
            "width": int(width),
            "small_input": True,
            "channels": None,
        }
    if name not in ARCHS and name not in STUDENT_ONLY:
        raise UserError(
            f"unknown architecture {name!r}; choose one of "
            f"{sorted(ARCHS) + list(STUDENT_ONLY) + ['cifar_resnet']}"
        )
    return {
        "name": name,
        "num_classes": int(num_classes),
        "width": int(width),
        "small_input": bool(small_input),
        "channels": None,
    }


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


def _as_count(value) -> int | None:
    """`value` as a whole number if it is one (int, 0-d integer tensor), else None; never a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):
        return None


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
    block, blocks = ARCHS[arch["name"]]
    width, classes = _as_count(arch["width"]), _as_count(arch["num_classes"])
    small = arch["small_input"]
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
    depth, width = _as_count(arch["depth"]), _as_count(arch["width"])
    classes = _as_count(arch["num_classes"])
    if depth not in CIFAR_DEPTHS or width is None or classes is None:
        return {}  # CifarResNet / build_model say what is wrong
    table = {
        "conv1": _Layer("conv", 3, width, kernel=3, pixels=size * size),
        "bn1": _Layer("bn", width, width),
    }
    inplanes = width
    for stage, stride in enumerate((1, 2, 2), start=1):
        planes = width * 2 ** (stage - 1)
        for index in range((depth - 2) // 6):
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


def _mobilenet_layers(arch: dict, size: int) -> dict[str, _Layer]:
    """MobileNetV3Small as torchvision builds it (its own configuration table, width-scaled)."""
    from torchvision.models._utils import _make_divisible
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

    width, classes = _as_count(arch["width"]), _as_count(arch["num_classes"])
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
            features = _as_count(counts[0])
            if features is not None:
                layer.cin = layer.cout = features
        elif len(counts) == 2:
            out, cin = _as_count(counts[0]), _as_count(counts[1])
            if out is not None and cin is not None:
                layer.cout, layer.cin = out, cin


def _factorized(table: dict[str, _Layer], ranks) -> None:
    """Split layers as factorized_structure does: k x k to `rank`, then 1x1 back."""
    for name, value in ranks.items() if isinstance(ranks, dict) else []:
        layer, rank = table.get(name), _as_count(value)
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
    one value (a width, a class count, a layer's channels) or the whole model (its parameter
    count, its activations for one `image_size` image)."""
    if not isinstance(arch, dict):
        return  # build_model names what is wrong with it
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
        count = _as_count(value)
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


def build_model(arch: dict, *, image_size: int | None = None) -> nn.Module:
    """Rebuild a model from its architecture record (pruned channel counts included).

    The record is checked first (`check_arch_size`, at `image_size` when the caller knows the
    data's), so a corrupt or hostile one is one line, never a huge allocation."""
    check_arch_size(arch, image_size=image_size)
    try:
        if arch["name"] == "mobilenet_v3_small":
            model = MobileNetV3Small(
                num_classes=arch["num_classes"],
                width=arch["width"],
                small_input=arch["small_input"],
            )
        elif arch["name"] == "cifar_resnet":
            model = CifarResNet(
                depth=arch["depth"], num_classes=arch["num_classes"], width=arch["width"]
            )
        else:
            block, layers = ARCHS[arch["name"]]
            model = ResNet(
                block,
                layers,
                num_classes=arch["num_classes"],
                width=arch["width"],
                small_input=arch["small_input"],
            )
        if arch.get("channels"):
            resize_to_channels(model, arch["channels"])
        if arch.get(
            "lowrank"
        ):  # {layer: rank} of an SVD-factorized model (resnet_slim/compress/lowrank.py)
            factorized_structure(model, arch["lowrank"])
        freeze_shortcuts(model)  # layers re-created above come back trainable
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise UserError(
            f"bad architecture record {str(arch)[:200]}: {err.__class__.__name__}: {err}"
        ) from None
    return model


def load_model(
    path, *, num_classes: int | None = None, image_size: int | None = None
) -> tuple[nn.Module, dict]:
    """(model rebuilt from a checkpoint's architecture record with its weights, the checkpoint).

    With `num_classes` (the prepared dataset's), a model trained for another dataset is refused;
    with `image_size` (the prepared dataset's), the record's activations are bounded at that size.
    """
    from resnet_slim.io import load_checkpoint

    checkpoint = load_checkpoint(path)
    try:
        model = build_model(checkpoint["arch"], image_size=image_size)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if num_classes is not None and checkpoint["arch"]["num_classes"] != num_classes:
        raise UserError(
            f"{path}: model has {checkpoint['arch']['num_classes']} classes but the "
            f"prepared dataset has {num_classes}; re-train it on this dataset"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise UserError(
            f"{path}: weights do not match the checkpoint's architecture record ({detail})"
        ) from None
    return model, checkpoint


def channel_record(model: nn.Module) -> dict[str, list[int]]:
    """[out, in] channels of every conv, [features] of every BN and [out, in] of the classifier."""
    record = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            record[name] = [module.out_channels, module.in_channels]
        elif isinstance(module, nn.BatchNorm2d):
            record[name] = [module.num_features]
        elif isinstance(module, nn.Linear):
            record[name] = [module.out_features, module.in_features]
    return record


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the dotted `name` ("layer1.0.conv1", or a top-level "fc") is in `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def resize_to_channels(model: nn.Module, channels: dict[str, list[int]]) -> None:
    """Re-create conv/BN/linear layers with recorded channel counts (weights are loaded after)."""
    for name, module in list(model.named_modules()):
        if name not in channels:
            continue
        if isinstance(module, nn.Conv2d):
            out_c, in_c = channels[name]
            new = nn.Conv2d(
                in_c,
                out_c,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(channels[name][0], eps=module.eps, momentum=module.momentum)
        elif isinstance(module, nn.Linear):
            out_f, in_f = channels[name]
            new = nn.Linear(in_f, out_f, bias=module.bias is not None)
        else:
            raise UserError(
                f"architecture record names {name!r}, which is a "
                f"{module.__class__.__name__}, not a conv/BN/linear layer"
            )
        replace_submodule(model, name, new)


def low_rank_pair(module: nn.Module, rank: int) -> nn.Sequential:
    """The two-layer replacement of `module`, weights uninitialised (filled by the caller)."""
    if isinstance(module, nn.Linear):
        return nn.Sequential(
            nn.Linear(module.in_features, rank, bias=False),
            nn.Linear(rank, module.out_features, bias=module.bias is not None),
        )
    return nn.Sequential(
        nn.Conv2d(
            module.in_channels,
            rank,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            bias=False,
        ),
        nn.Conv2d(rank, module.out_channels, 1, bias=module.bias is not None),
    )


def factorized_structure(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Swap each named layer for its rank-r pair (fresh weights): rebuilding from a checkpoint."""
    for name, rank in ranks.items():
        module = model.get_submodule(name)  # AttributeError, like a bad rank, is a bad record
        if (
            not isinstance(module, (nn.Conv2d, nn.Linear))
            or getattr(module, "groups", 1) != 1
            or not isinstance(rank, int)
            or isinstance(rank, bool)
            or rank < 1
        ):
            raise ValueError(
                f"{name}: cannot factorize {module.__class__.__name__} to rank {rank!r}"
            )
        replace_submodule(model, name, low_rank_pair(module, rank))
    return model

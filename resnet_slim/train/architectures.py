"""The networks: torchvision's ResNets with the width and the stem as builder arguments, He et
al.'s CIFAR ResNets, and MobileNetV3-Small as a student.

With `width=64, small_input=False` the module tree and state_dict keys are exactly torchvision's
`resnet18/34/50`, so weights trained elsewhere load unchanged. `CifarResNet` is He et al.'s CIFAR
family (depth 6n+2) with the key names of the common CIFAR checkpoints (conv1, bn1, layer1..3,
linear), so those load unchanged too (resnet_slim/train/model_import.py). Models are built from
their architecture records by resnet_slim/train/models.py.

Both ResNets take `blocks`, the residual blocks per stage left by depth pruning
(resnet_slim/compress/depth.py): without it each stage has the architecture's own count, so the
module tree is unchanged; with it a stage keeps its first `blocks[i]` blocks, numbered from 0.
"""

import operator

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from resnet_slim import registry
from resnet_slim.errors import UserError

ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def check_blocks(blocks, own: list[int], what: str) -> list[int]:
    """`blocks` (residual blocks per stage after depth pruning) as ints; `own` when None.

    Each stage keeps 1..its own count: the first block carries the stage's stride and shortcut,
    and depth pruning only ever removes blocks, so more than the architecture has is no record of
    this tool (and would be an unbounded model). Anything else is one UserError.
    """
    if blocks is None:
        return list(own)
    if not isinstance(blocks, (list, tuple)):
        raise UserError(
            f"blocks of a {what} must be a list of {len(own)} per-stage block counts, "
            f"got a {type(blocks).__name__}"
        )
    if len(blocks) != len(own):
        raise UserError(
            f"blocks of a {what} must list {len(own)} per-stage block counts, got {len(blocks)}"
        )
    counts = []
    for stage, (value, limit) in enumerate(zip(blocks, own, strict=True), start=1):
        count = as_count(value)
        if count is None or not 1 <= count <= limit:
            raise UserError(
                f"blocks of a {what}: stage {stage} has {repr(value)[:40]} blocks; each stage "
                f"keeps 1..its own count {list(own)}"
            )
        counts.append(count)
    return counts


def as_count(value) -> int | None:
    """`value` as a whole number if it is one (int, 0-d integer tensor), else None; never a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class ResNet(nn.Module):
    """torchvision's ResNet (He et al. 2015, arXiv:1512.03385) with stage widths w, 2w, 4w, 8w.

    `layers` is the architecture's blocks per stage; `blocks`, if given, the fewer left by depth
    pruning (`check_blocks`).
    """

    classifier_name = "fc"  # the layer whose outputs are the classes (never pruned, replaceable)

    def __init__(
        self,
        block,
        layers: list[int],
        *,
        num_classes: int,
        width: int = 64,
        small_input: bool = False,
        blocks: list[int] | None = None,
    ):
        super().__init__()
        layers = check_blocks(blocks, layers, f"ResNet with {list(layers)} blocks")
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
    no parameters) get the fixed option-A weights filled in when loaded. After depth pruning,
    `depth` stays the original network's and `blocks` holds the per-stage counts left.
    """

    classifier_name = "linear"

    def __init__(
        self, *, depth: int, num_classes: int, width: int = 16, blocks: list[int] | None = None
    ):
        nn.Module.__init__(self)
        if depth not in CIFAR_DEPTHS:
            raise UserError(
                f"cifar_resnet depth must be one of {list(CIFAR_DEPTHS)} (6n+2), got {depth}"
            )
        own = [(depth - 2) // 6] * 3
        counts = check_blocks(blocks, own, f"cifar_resnet of depth {depth}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, counts[0], stride=1)
        self.layer2 = self._make_layer(width * 2, counts[1], stride=2)
        self.layer3 = self._make_layer(width * 4, counts[2], stride=2)
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


STUDENT_ONLY = registry.STUDENT_ONLY_ARCHS

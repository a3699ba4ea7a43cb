"""Bring your own trained model: read a ResNet checkpoint from elsewhere as this project's model.

Formats:
* `resnet_slim`: this project's checkpoints (`{"state_dict", "arch", ...}`,
resnet_slim/checkpoints.py). * `torchvision`: a state dict of torchvision's resnet18/34/50 (any
class count, any stem: a 7x7/2
  conv + max-pool for ImageNet or the 3x3/1 small-input stem; read from conv1's kernel size).
* `cifar_resnet`: He et al.'s CIFAR ResNets 20/32/44/56/110 (architectures.CifarResNet; the depth
  is read from the number of blocks in the keys).
* `auto`: whichever of the above the file's keys match.

A state dict may be bare or wrapped as `{"state_dict": ...}`, with or without DataParallel's
`module.` prefix. Loading is always `weights_only=True`: a file that needs pickled code is refused,
never loaded unsafely. The family is found by comparing the file's keys with the keys each
candidate architecture has, so a file that matches none is described by the closest one.
"""

from pathlib import Path

import torch
from torch import nn

from resnet_slim.checkpoints import safe_torch_load
from resnet_slim.errors import UserError
from resnet_slim.io import sha256_file
from resnet_slim.train.architectures import ARCHS, CIFAR_DEPTHS, freeze_shortcuts, shortcut_convs
from resnet_slim.train.models import build_model, make_arch, replace_submodule

FORMATS = ("auto", "resnet_slim", "torchvision", "cifar_resnet")
# dvc.yaml makes this folder a dependency of the stages that import models: a file brought there
# (`dvc add models/imported/<file>`) re-runs them when its content changes
TRACKED_DIR = Path("models/imported")
# buffers that torch adds or fills itself (BN's batch counter; older files lack it)
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def import_model(
    path: str | Path,
    fmt: str = "auto",
    *,
    num_classes: int,
    replace_head: bool = False,
    key: str = "teacher",
) -> tuple[nn.Module, dict, dict]:
    """(model with the file's weights, its architecture record, origin {file, format, sha256, ...}).

    `num_classes` is the data's class count. A file with another count is refused unless
    `replace_head`, which re-initialises the classifier for `num_classes` (transfer learning to
    another label set, whatever its size).
    `key` is the params section named in error messages (teacher, distill.student).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"{key}.format {fmt!r} is unknown; choose one of {list(FORMATS)}")
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    model, arch, found = _read_model(path, fmt, key=key)
    classes_in_file = arch["num_classes"]
    arch = _fit_head(path, model, arch, num_classes, replace_head=replace_head, key=key)
    origin = {
        "file": str(path),
        "format": found,
        "sha256": sha256_file(path),
        "family": describe(arch),
        "classes_in_file": classes_in_file,
        "head_replaced": replace_head,
        "tracked_by_dvc": is_tracked(path),
    }
    return model, arch, origin


def _read_model(path: Path, fmt: str, *, key: str) -> tuple[nn.Module, dict, str]:
    """(model, architecture record, the format found) of the file: a project checkpoint when it
    has one's keys and `fmt` allows it, else a foreign state dict of the families `fmt` allows."""
    loaded = safe_torch_load(path, what="model file")
    if (
        isinstance(loaded, dict)
        and "arch" in loaded
        and "state_dict" in loaded
        and fmt in ("auto", "resnet_slim")
    ):
        return _project_checkpoint(path, loaded), dict(loaded["arch"]), "resnet_slim"
    if fmt == "resnet_slim":
        raise UserError(
            f"{path}: not a resnet_slim checkpoint (no 'arch' and 'state_dict'); "
            f"set {key}.format to auto, torchvision or cifar_resnet"
        )
    return _foreign_state_dict(path, _state_dict_of(path, loaded), fmt)


def _fit_head(
    path: Path, model: nn.Module, arch: dict, num_classes: int, *, replace_head: bool, key: str
) -> dict:
    """The record once the classifier matches the data's `num_classes`: another count is an error
    unless `replace_head`, which puts a fresh classifier in `model`."""
    classes_in_file = arch["num_classes"]
    if classes_in_file != num_classes and not replace_head:
        raise UserError(
            f"{path}: the model predicts {classes_in_file} classes but the data "
            f"has {num_classes}; set {key}.replace_head: true to re-initialise "
            f"the classifier for {num_classes} classes (and train it)"
        )
    if replace_head:  # also with an equal count: another label set needs a fresh classifier
        _replace_classifier(model, num_classes)
        arch = {**arch, "num_classes": num_classes}
        if arch.get("channels"):
            arch["channels"] = {**arch["channels"]}
            out_in = arch["channels"].get(model.classifier_name)
            if out_in is not None:
                arch["channels"][model.classifier_name] = [num_classes, out_in[1]]
    return arch


def is_tracked(path: Path) -> bool:
    """True for a file inside TRACKED_DIR (relative to the workspace, where stages run)."""
    return TRACKED_DIR.resolve() in path.resolve().parents


def untracked_note(origin: dict) -> str | None:
    """The warning for an imported file that DVC does not track (None when it does)."""
    if origin.get("tracked_by_dvc"):
        return None
    return (
        f"{origin['file']} is outside {TRACKED_DIR}/, so DVC tracks its path but not its "
        f"content (sha256 {origin['sha256'][:12]} is recorded); to re-run on an edited file, "
        f"copy it there and `dvc add` it"
    )


def describe(arch: dict) -> str:
    """A short name: resnet18, resnet50 (width 32), cifar_resnet56, ..."""
    name = f"cifar_resnet{arch['depth']}" if arch["name"] == "cifar_resnet" else arch["name"]
    standard = 16 if arch["name"] in ("cifar_resnet", "mobilenet_v3_small") else 64
    return name if arch.get("width", standard) == standard else f"{name} (width {arch['width']})"


def _project_checkpoint(path: Path, checkpoint: dict) -> nn.Module:
    try:  # the record is checked (per value and whole-model size) before anything is built
        model = build_model(checkpoint["arch"])
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    _load(path, model, checkpoint["state_dict"], family=describe(checkpoint["arch"]))
    return model


def _state_dict_of(path: Path, loaded) -> dict[str, torch.Tensor]:
    """The tensors of a bare or {"state_dict": ...}-wrapped state dict, `module.` prefix removed."""
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise UserError(
            f"{path}: not a state dict (expected a mapping of parameter names to "
            f"tensors, bare or under 'state_dict'; got {type(state).__name__})"
        )
    if all(key.startswith("module.") for key in state):  # saved from a DataParallel wrapper
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def _candidates(fmt: str) -> dict[str, dict]:
    """{family: architecture record (placeholder width/classes)} for the families `fmt` allows."""
    records = {}
    if fmt in ("auto", "torchvision"):
        for name in ARCHS:
            records[name] = make_arch(name=name, num_classes=2, width=8, small_input=True)
    if fmt in ("auto", "cifar_resnet"):
        for depth in CIFAR_DEPTHS:
            records[f"cifar_resnet{depth}"] = make_arch(
                name="cifar_resnet", depth=depth, num_classes=2, width=8
            )
    return records


def _expected_keys(arch: dict) -> tuple[set[str], set[str]]:
    """(keys a file of this family must have, keys it may have)."""
    model = build_model(arch)
    keys = {k for k in model.state_dict() if not k.endswith(OPTIONAL_SUFFIXES)}
    # option-A shortcut weights are fixed: the files that use option A do not store them
    optional = {f"{name}.weight" for name in shortcut_convs(model)}
    return keys - optional, optional


def _foreign_state_dict(
    path: Path, state: dict[str, torch.Tensor], fmt: str
) -> tuple[nn.Module, dict, str]:
    given = {k for k in state if not k.endswith(OPTIONAL_SUFFIXES)}
    mismatch = {}
    for family, record in _candidates(fmt).items():
        required, optional = _expected_keys(record)
        unexpected, missing = sorted(given - required - optional), sorted(required - given)
        if not unexpected and not missing:
            arch = _arch_from_weights(path, record, state)
            try:  # sizes read from the tensors' shapes are bounded like a record's
                model = build_model(arch)
            except UserError as err:
                raise UserError(f"{path}: {err}") from None
            _load(path, model, state, family=describe(arch))
            return model, arch, "cifar_resnet" if arch["name"] == "cifar_resnet" else "torchvision"
        mismatch[family] = (unexpected, missing)
    closest = min(mismatch, key=lambda f: len(mismatch[f][0]) + len(mismatch[f][1]))
    unexpected, missing = mismatch[closest]
    which = "any family" if fmt == "auto" else f"the {fmt} format"
    raise UserError(
        f"{path}: keys match no model of {which}; closest is {closest}, but the file "
        f"has {len(unexpected)} unexpected key(s) {unexpected[:3]} and lacks "
        f"{len(missing)} {missing[:3]}"
    )


def _arch_from_weights(path: Path, record: dict, state: dict[str, torch.Tensor]) -> dict:
    """The candidate's record with width, stem and class count read from the file's tensors."""
    classifier = "linear" if record["name"] == "cifar_resnet" else "fc"
    stem, head = state["conv1.weight"], state[f"{classifier}.weight"]
    if stem.ndim != 4 or head.ndim != 2:
        raise UserError(
            f"{path}: conv1.weight has shape {list(stem.shape)} and the classifier "
            f"{list(head.shape)}; expected a 4-D conv and a 2-D linear weight"
        )
    kernel = stem.shape[-1]
    if record["name"] == "cifar_resnet":
        if kernel != 3:
            raise UserError(f"{path}: conv1 is {kernel}x{kernel}; a CIFAR ResNet's stem is 3x3")
        return make_arch(
            name="cifar_resnet",
            depth=record["depth"],
            num_classes=head.shape[0],
            width=stem.shape[0],
        )
    if kernel not in (3, 7):
        raise UserError(
            f"{path}: conv1 is {kernel}x{kernel}; expected the ImageNet 7x7 stem or "
            f"the small-input 3x3 stem"
        )
    # 7x7/2 + max-pool: the ImageNet stem; 3x3/1 without max-pool: the small-input (CIFAR) stem
    return make_arch(
        name=record["name"], num_classes=head.shape[0], width=stem.shape[0], small_input=kernel == 3
    )


def _load(path: Path, model: nn.Module, state: dict, *, family: str) -> None:
    """Strict load with one readable line for the first shape mismatch or missing key."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"{path}: {key} has shape {list(value.shape)} in the file but "
                f"{list(own[key].shape)} in {family}; the file is not a {family} "
                f"(or was altered)"
            )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0] if lines else ""
        raise UserError(f"{path}: weights do not fit {family} ({detail[:300]})") from None
    freeze_shortcuts(model)


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """A freshly initialised classifier for `num_classes` (torch's default Linear init)."""
    old = model.get_submodule(model.classifier_name)
    if not isinstance(old, nn.Linear):  # e.g. split in two by the lowrank stage
        raise UserError(
            f"cannot replace the classifier {model.classifier_name!r}: it is a "
            f"{old.__class__.__name__}, not one linear layer; import an unfactorized "
            f"checkpoint"
        )
    replace_submodule(
        model,
        model.classifier_name,
        nn.Linear(old.in_features, num_classes, bias=old.bias is not None),
    )

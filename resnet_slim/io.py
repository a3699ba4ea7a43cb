"""Atomic file writes and checkpoints.

Every output goes to a temp path beside its destination and is renamed into place only when
complete, so a crash, Ctrl-C or SIGTERM never leaves a half-written file for DVC to cache.
"""

import json
import math
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from resnet_slim.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path (file or directory) that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _finite_or_none(obj):
    # JSON has no NaN: write null so readers (the gate) see "missing", never a fake number.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite_or_none(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: {what} is not valid JSON ({err})") from None
    except OSError as err:  # permissions, I/O errors
        raise UserError(f"{path}: cannot read {what} ({err.strerror or err})") from None


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, arch: dict, params: dict,
                    metrics: dict) -> None:
    """Save weights plus everything needed to rebuild the model; no pickled modules."""
    checkpoint = {"state_dict": model.state_dict(), "arch": arch, "params": params,
                  "metrics": metrics}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (`weights_only=True`: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    checkpoint = safe_torch_load(path, what="checkpoint")
    missing = {"state_dict", "arch"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f"{path}: checkpoint lacks {sorted(missing)}; was it written by this tool?")
    return checkpoint


def safe_torch_load(path: str | Path, *, what: str):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never pickled code.

    Every failure (truncated file, not a torch file, pickled modules refused) is one UserError.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise UserError(f"{path}: not a loadable {what} ({_load_failure(err)})") from None


def _load_failure(err: Exception) -> str:
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
        detail = " ".join(found.group(1).split()) if found else "unsupported content"
        return (f"refused by the safe loader, weights_only=True: {detail}; the file holds pickled "
                f"Python objects or is not a torch file at all")
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else "no detail"
    return f"{err.__class__.__name__}: {first}; is the file truncated or corrupt?"

"""Checkpoints: save a model's weights with what rebuilds it, and load them back safely.

Saving goes through resnet_slim.io's atomic writes; loading is `torch.load(weights_only=True)`,
so a checkpoint can hold tensors and plain containers only, never pickled code.
"""

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path

if TYPE_CHECKING:  # torch is imported where checkpoints are read or written: `prepare` never
    import torch  # loads it (its import alone is ~600 MB of RSS with a CUDA build)


def save_checkpoint(
    path: str | Path,
    *,
    model: "torch.nn.Module",
    arch: dict,
    params: dict,
    metrics: dict,
    atomic: bool = True,
) -> None:
    """Save weights plus everything needed to rebuild the model; no pickled modules.

    `atomic=False` writes `path` directly: for a caller that already writes to a temp path
    (a member of `write_together`)."""
    import torch

    checkpoint = {
        "state_dict": model.state_dict(),
        "arch": arch,
        "params": params,
        "metrics": metrics,
    }
    if not atomic:
        torch.save(checkpoint, path)
        return
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
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe files
        raise UserError(f"{path}: not a loadable {what} ({_load_failure(err)})") from None


def _load_failure(err: Exception) -> str:
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
        detail = " ".join(found.group(1).split()) if found else "unsupported content"
        return (
            f"refused by the safe loader, weights_only=True: {detail}; the file holds pickled "
            f"Python objects or is not a torch file at all"
        )
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else "no detail"
    return f"{err.__class__.__name__}: {first}; is the file truncated or corrupt?"

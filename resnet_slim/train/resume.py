"""Resumable training: a checkpoint after every epoch, used only by a re-run of the same work.

A training stage opens `checkpoints(out, sections)` around its work; inside it, every `engine.fit`
writes `<out's folder>/.resume/<out's name>/<phase>-rank<r>.pt` after each epoch (atomically) with
everything the next epoch reads: weights, optimizer and scheduler state, the history (the DVCLive
curves are replayed from it), and the state of every random generator in use (torch's, Python's,
numpy's, the loader's order and augmentation generators). When the stage has written its outputs
the folder is removed. A stopped stage (SIGTERM, SIGKILL, a lost machine) re-run on the same work
continues after its last finished epoch, and on CPU ends with byte-identical weights and metrics.

"The same work" is a key stored in the checkpoint and compared before anything is loaded: the
params sections the stage reads, the world size, the source of every project module loaded when
training starts, a digest of the training and validation data, and a digest of the model and the
random state the phase starts from (which covers everything upstream: an earlier phase of the same
stage, pruning, a changed input checkpoint). Anything different, or a file that fails its sha256 or
cannot be loaded, is discarded with one line naming the cause, and training starts from epoch 0.

Not covered: a checkpoint within an epoch (at most one epoch of work is lost), and a change of the
number of processes (the loader's shards differ; the checkpoint is discarded).
"""

import hashlib
import io as bytes_io
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_slim.io import atomic_path
from resnet_slim.train import distributed

FORMAT = b"resnet-slim resume 1\n"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the workspace: resnet_slim/train/ -> ../../


@dataclass
class Session:
    directory: Path
    params: dict  # {"section.key": value} of every params section the stage reads


_session: Session | None = None


def resume_dir(out: str | Path) -> Path:
    """Where the checkpoints of the stage writing `out` live: beside it, never a DVC output."""
    out = Path(out)
    return out.parent / ".resume" / out.name


@contextmanager
def checkpoints(out: str | Path, sections: dict) -> Iterator[Session]:
    """Make every `engine.fit` inside the block resumable; remove the checkpoints when the block
    ends normally (the stage has written its outputs), keep them when it is stopped or fails."""
    global _session
    session = Session(resume_dir(out), _flatten(sections))
    _session = session
    try:
        yield session
    finally:
        _session = None
    if distributed.is_main_process():
        shutil.rmtree(session.directory, ignore_errors=True)
        try:
            session.directory.parent.rmdir()  # `.resume` itself, once no other stage's is left
        except OSError:
            pass  # another stage's checkpoints are in it, or it is gone


def resumable(out: str | Path, params, section: str, train: Callable[[object], None]):
    """`train(device)` of a training stage inside `checkpoints(out, ...)`, keyed on the params it
    trains with: base (less base.seeds, read by seed_repeats only) and its own `section`."""

    def run(device) -> None:
        sections = {
            "base": params.base.model_dump(exclude={"seeds"}),
            section: getattr(params, section),
        }
        with checkpoints(out, sections):
            train(device)

    return run


def current() -> Session | None:
    return _session


def _flatten(sections: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in sections.items():
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# ---------------------------------------------------------------- the key


def _digest_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def _data_digest(*loaders) -> str:
    """Digest of what the loaders yield from: their pixel arrays and targets, in order."""
    digest = hashlib.sha256()
    for loader in loaders:
        images = np.asarray(loader.images)
        digest.update(f"{images.dtype}{images.shape}".encode())
        for start in range(0, len(images), 4096):  # a memory map: read in blocks
            digest.update(np.ascontiguousarray(images[start : start + 4096]).tobytes())
        for target in loader.targets:
            _digest_tensor(digest, target)
    return digest.hexdigest()


def _start_digest(model: nn.Module, generators: list[torch.Generator]) -> str:
    """Digest of the weights and random state a phase starts from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        _digest_tensor(digest, tensor)
    for state in (torch.get_rng_state(), *(g.get_state() for g in generators)):
        _digest_tensor(digest, state)
    digest.update(repr(random.getstate()).encode())
    digest.update(repr(_numpy_rng_state()).encode())
    return digest.hexdigest()


def _loaded_project_code() -> dict[str, str]:
    """{path: sha256} of the library's and the stages' modules this process has imported."""
    code = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.partition(".")[0] not in ("resnet_slim", "stages") or not file:
            continue
        path = Path(file).resolve()
        if _PROJECT_ROOT in path.parents:  # the workspace's own copy, not an installed one
            relative = str(path.relative_to(_PROJECT_ROOT))
            code[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(code.items()))


def fit_key(session: Session, *, desc: str, model: nn.Module, train_loader, val_loader) -> dict:
    """What a checkpoint of this phase must have been written by, component by component."""
    return {
        "phase": desc,
        "world_size": distributed.world_size(),
        "params": session.params,
        "code": _loaded_project_code(),
        "data": _data_digest(train_loader, val_loader),
        "start": _start_digest(model, _generators(train_loader)),
    }


def _key_difference(saved: dict, key: dict) -> str | None:
    """The first reason `saved` is not `key`, in words; None when they are the same."""
    if saved.get("phase") != key["phase"]:
        return f"it belongs to phase {saved.get('phase')!r}"
    if saved.get("world_size") != key["world_size"]:
        return (
            f"it was written by {saved.get('world_size')} process(es), this run has "
            f"{key['world_size']}"
        )
    for part, what in (("params", "params changed"), ("code", "code changed")):
        old, new = saved.get(part) or {}, key[part]
        changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            return f"{what} ({', '.join(changed[:3])}{more})"
    if saved.get("data") != key["data"]:
        return "the training or validation data changed"
    if saved.get("start") != key["start"]:
        return (
            "the model or random state this phase starts from changed (an input or an "
            "earlier phase)"
        )
    return None


# ---------------------------------------------------------------- the loop's checkpoints


def epoch_checkpoints(
    model, optimizer, scheduler, history, train_loader, val_loader, *, desc: str
) -> Callable[[int], None] | None:
    """Inside a stage's `checkpoints`: load this phase's checkpoint when it was written by
    the same work (weights, optimizer, scheduler, history and random state restored in place),
    and return the function that writes one after each epoch; None outside one. `model` may be
    DDP-wrapped; the plain model inside is what is saved."""
    session = current()
    if session is None:
        return None
    plain = distributed.unwrap(model)
    key = fit_key(session, desc=desc, model=plain, train_loader=train_loader, val_loader=val_loader)
    path = checkpoint_path(session, desc)
    checkpoint, why = load(path, key)
    # every rank resumes or none does: ranks that disagree on the epoch would deadlock DDP
    ranks_resuming = distributed.all_reduce_sum([int(checkpoint is not None)])[0]
    if checkpoint is not None and ranks_resuming != distributed.world_size():
        checkpoint, why = None, "another process's checkpoint is missing or was discarded"
    if why is not None:
        discard(path, why, desc)
    if checkpoint is not None:
        plain.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history.extend(checkpoint["history"])
        set_random_state(checkpoint["random"], train_loader)
        if distributed.is_main_process():
            print(f"{desc}: resumed after epoch {len(history)} from {path}", flush=True)

    def save_epoch(epochs_done: int) -> None:
        save(
            path,
            {
                "key": key,
                "epochs_done": epochs_done,
                "model": plain.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": list(history),
                "random": random_state(train_loader),
            },
        )

    return save_epoch


# ---------------------------------------------------------------- random state


def _generators(loader) -> list[torch.Generator]:
    found = []
    for name in ("generator", "augment_generator"):
        generator = getattr(loader, name, None)
        if generator is not None and all(generator is not g for g in found):
            found.append(generator)
    return found


def _numpy_rng_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def random_state(train_loader) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": _numpy_rng_state(),
        "loader": [g.get_state() for g in _generators(train_loader)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict, train_loader) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    for generator, saved in zip(_generators(train_loader), state["loader"], strict=True):
        generator.set_state(saved)
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- files


def checkpoint_path(session: Session, desc: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", desc).strip("-") or "fit"
    return session.directory / f"{slug}-rank{distributed.rank()}.pt"


def save(path: Path, checkpoint: dict) -> None:
    """Write a checkpoint atomically, its sha256 in the header (a torn file is caught)."""
    buffer = bytes_io.BytesIO()
    torch.save(checkpoint, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            file.write(FORMAT + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
            file.flush()
            os.fsync(file.fileno())


def load(path: Path, key: dict) -> tuple[dict | None, str | None]:
    """(checkpoint, None) when `path` holds a whole checkpoint of `key`'s work; else (None, why
    not) for a file that exists, and (None, None) when there is none."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"cannot read it ({err.strerror})"
    header_end = len(FORMAT) + 65
    if not blob.startswith(FORMAT) or len(blob) < header_end:
        return None, "it is not a resume checkpoint of this tool, or is cut short"
    expected, payload = (
        blob[len(FORMAT) : header_end - 1].decode(errors="replace"),
        blob[header_end:],
    )
    if hashlib.sha256(payload).hexdigest() != expected:
        return None, "its sha256 does not match its contents (truncated or corrupt)"
    try:
        checkpoint = torch.load(bytes_io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        return None, f"it cannot be loaded ({err.__class__.__name__})"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("key"), dict):
        return None, "it has no key"
    why = _key_difference(checkpoint["key"], key)
    return (None, why) if why else (checkpoint, None)


def discard(path: Path, why: str, desc: str) -> None:
    if distributed.is_main_process():
        print(
            f"{desc}: not resuming from {path}: {why}; training from epoch 1",
            file=sys.stderr,
            flush=True,
        )
    path.unlink(missing_ok=True)

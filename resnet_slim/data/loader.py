"""Prepared datasets: read the splits `prepare` wrote and feed them to models as batches.

A prepared dataset (resnet_slim/data/prepare.py) is a directory with `<split>_images.npy` (uint8
N x S x S x 3) and `<split>_labels.npy` (int64) per split, `manifest.csv` (one row per image) and
`meta.json` (class names, size, normalisation). Splits are opened as read-only memory maps: a batch
reads only its own rows, and pages already read are handed back (`release_pages`), so a split
larger than RAM trains in a small, bounded resident set.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from resnet_slim.data.pixels import (
    IMAGES_FILE,
    LABELS_FILE,
    map_pixels,
    release_pages,
    to_rgb_array,
)
from resnet_slim.errors import UserError
from resnet_slim.io import read_json
from resnet_slim.limits import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Split:
    images: np.ndarray  # uint8, N x H x W x 3, a read-only memory map of <split>_images.npy
    labels: torch.Tensor  # int64, N


def load_meta(prepared_dir: str | Path) -> dict:
    """data/prepared/meta.json, checked: every stage, ONNX evaluation, the benchmark and the web
    UI take the class names, image size and normalisation from it, so a damaged or hand-edited
    file is one line here, not a crash or a silently wrong score later (std [0, 0, 0] would feed
    every model inf / NaN inputs)."""
    path = Path(prepared_dir) / "meta.json"
    meta = read_json(path, what="prepared dataset metadata")  # a 5,000-digit number: one line
    missing = {"class_names", "image_size", "mean", "std"} - set(
        meta if isinstance(meta, dict) else ()
    )
    if missing:
        raise UserError(
            f"{path}: prepared dataset metadata lacks {sorted(missing)}; re-run the prepare stage"
        )
    if problem := meta_problem(meta):
        raise UserError(f"{path}: prepared dataset metadata: {problem}; re-run the prepare stage")
    return meta


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def meta_problem(meta: dict) -> str | None:
    """What is wrong with meta.json's class_names, image_size, mean and std, or None."""
    size = meta["image_size"]
    if not isinstance(size, int) or isinstance(size, bool):
        return f"image_size must be an integer (got {_shown(size)})"
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        return f"image_size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px"
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(map(_is_number, values))):
            return f"{key} must be 3 finite numbers, one per RGB channel (got {_shown(values)})"
    if not all(std > 0 for std in meta["std"]):
        return f"std must be > 0 for every channel (got {_shown(meta['std'])})"
    # normalised pixels, (x - mean) / std for x in [0, 1], must be finite float32 numbers
    if not all(
        (1.0 + abs(mean)) / std < FLOAT32_MAX
        for mean, std in zip(meta["mean"], meta["std"], strict=True)
    ):
        return (
            f"mean {_shown(meta['mean'])} / std {_shown(meta['std'])} would overflow float32 inputs"
        )
    names = meta["class_names"]
    if not isinstance(names, list) or not names:
        return f"class_names must be a non-empty list (got {_shown(names)})"
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            return f"class_names must be non-empty strings (got {_shown(name)})"
        if name in seen:
            return f"class_names lists {_shown(name)} more than once"
        seen.add(name)
    return None


# what pandas raises on a CSV it cannot parse, decode or read (prepared manifests, predictions)
CSV_READ_ERRORS = (
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
    UnicodeDecodeError,
    ValueError,
    OSError,
)


def load_manifest(prepared_dir: str | Path) -> pd.DataFrame:
    path = Path(prepared_dir) / "manifest.csv"
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; run the prepare stage first")
    text_columns = {c: str for c in ("id", "split", "class_name", "sha256")}
    try:
        return pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""])
    except CSV_READ_ERRORS as err:
        raise UserError(
            f"{path}: manifest is not a readable CSV ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); re-run the "
            f"prepare stage"
        ) from None


def load_split(prepared_dir: str | Path, name: str) -> Split:
    images_path = Path(prepared_dir) / IMAGES_FILE.format(split=name)
    labels_path = Path(prepared_dir) / LABELS_FILE.format(split=name)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise UserError(f"{path}: prepared split not found; run the prepare stage first")
    try:
        with open(images_path, "rb") as file:  # the header says where the pixels start
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(file)
            offset = file.tell()
        expected = offset + int(np.prod(shape)) * dtype.itemsize
        if fortran_order or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images {shape} {dtype}; expected N x H x W x 3 uint8")
        if images_path.stat().st_size != expected:
            raise ValueError(f"{images_path.stat().st_size} bytes, the header says {expected}")
        images = map_pixels(images_path, shape, offset)
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        # a truncated or non-npy file fails in read_magic / read_header or the size check
        raise UserError(
            f"{images_path.parent / name}: prepared split is corrupt or incomplete "
            f"({err.__class__.__name__}: {err}); re-run the prepare stage"
        ) from None
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise UserError(
            f"{labels_path}: {labels.shape} {labels.dtype} labels for {len(images)} "
            f"images; re-run the prepare stage"
        )
    return Split(images=images, labels=torch.from_numpy(labels.astype(np.int64, copy=False)))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 (a memory map too) -> a uint8 N x 3 x H x W tensor in memory."""
    # a fancy-indexed batch is already a private copy; a mapped split is read-only: copy that
    pixels = np.ascontiguousarray(pixels) if pixels.flags.writeable else np.array(pixels)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, meta: dict) -> torch.Tensor:
    """uint8 NCHW -> float NCHW, standardised with the training-set mean/std (the model input)."""
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def check_finite_images(images, *, what: str) -> None:
    """Every normalised image holds only finite numbers (a meta.json std of 0 gives inf, a NaN
    mean NaN): a model scored or calibrated on them would be judged on garbage."""
    finite = np.isfinite(np.asarray(images)).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        raise UserError(
            f"{int((~finite).sum())} of {len(images)} {what} hold non-finite values (inf/NaN): "
            f"the prepared dataset's meta.json mean/std must be finite with every std > 0 "
            f"(a std of 0 divides by zero); re-run the prepare stage"
        )


def preprocess_image(image: Image.Image, meta: dict) -> np.ndarray:
    """One PIL image -> the model input, float32 1 x 3 x S x S.

    The same two steps the test split goes through (`to_rgb_array` in prepare, `normalize` at
    evaluation), so a served prediction sees exactly the pixels the benchmark measured.
    """
    pixels = to_rgb_array(image, int(meta["image_size"]))  # H x W x 3 uint8
    return normalize(to_tensor(pixels[None]), meta).numpy()


def augment_batch(
    images: torch.Tensor, *, crop_padding: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random translation (pad + crop) and optional flip, done on a whole uint8 batch at once."""
    n, _, h, w = images.shape
    if crop_padding > 0:
        padded = torch.nn.functional.pad(images, [crop_padding] * 4)
        dx = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w)
        cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 3, h, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        channel = torch.arange(3).view(1, 3, 1, 1)
        images = padded[batch, channel, rows, cols]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    return images


def shard_indices(
    order: torch.Tensor, *, rank: int, world_size: int, pad: bool = True
) -> torch.Tensor:
    """This rank's share of an epoch's order: every `world_size`-th index from `rank`.

    torch's DistributedSampler layout. pad=True repeats the first indices so that every rank gets
    ceil(n / world_size) (DDP needs the same number of steps on every rank); pad=False (evaluation)
    gives disjoint shards that cover each image exactly once.
    """
    if world_size == 1:
        return order
    if pad and len(order) % world_size:
        total = -(-len(order) // world_size) * world_size
        repeats = -(-total // len(order))
        order = order.repeat(repeats)[:total]
    return order[rank::world_size]


class BatchLoader:
    """Batches of (normalised images, targets...) from uint8 N x H x W x 3 pixels (a memory map).

    Extra per-image tensors (e.g. cached teacher logits) ride along with the labels, so the
    shared training loop can hand them to the loss unchanged. With `world_size` > 1 (DDP), each
    rank iterates its shard (`shard_indices`) of a permutation drawn alike on every rank: the
    order generator has the same seed everywhere and draws nothing else, so each pass reshuffles
    (like DistributedSampler.set_epoch) and the ranks stay disjoint; augmentation draws from a
    per-rank generator.
    """

    def __init__(
        self,
        images: np.ndarray,
        *targets: torch.Tensor,
        meta: dict,
        batch_size: int,
        shuffle: bool = False,
        augment=None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.images, self.targets, self.meta = images, targets, meta
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.generator = torch.Generator().manual_seed(seed)
        # one process: one generator for order and augmentation, as before sharding existed;
        # DDP: an independent augmentation stream per (seed, rank)
        self.augment_generator = self.generator
        if world_size > 1:
            per_rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
            self.augment_generator = torch.Generator().manual_seed(per_rank_seed)

    def __len__(self) -> int:
        shard = len(
            shard_indices(
                torch.arange(len(self.images)),
                rank=self.rank,
                world_size=self.world_size,
                pad=self.pad,
            )
        )
        return (shard + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = shard_indices(order, rank=self.rank, world_size=self.world_size, pad=self.pad)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            images = to_tensor(self.images[idx.numpy()])
            # a fault maps the page cache's whole (large) folio, up to 2 MB, not just the row:
            # measured 11x the bytes read at 224 px. Handing the pages back after every batch
            # (a few microseconds) keeps a pass over any split at one batch's worth of RSS
            release_pages(self.images)
            if self.augment is not None:
                images = augment_batch(
                    images,
                    crop_padding=self.augment.crop_padding,
                    hflip=self.augment.hflip,
                    generator=self.augment_generator,
                )
            targets = tuple(t[idx] for t in self.targets)
            yield normalize(images, self.meta), (targets[0] if len(targets) == 1 else targets)


def train_val_loaders(
    prepared_dir: str | Path,
    *,
    batch_size: int,
    augment,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
):
    """(train loader with augmentation and shuffling, val loader, meta) of a prepared dataset.

    With `world_size` > 1 both are this rank's shards and `batch_size` is the global batch,
    split evenly over the ranks (so the optimisation matches one process).
    """
    if batch_size % world_size:
        raise UserError(
            f"batch_size {batch_size} does not split evenly over {world_size} "
            f"processes; use a multiple of {world_size}"
        )
    meta = load_meta(prepared_dir)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    train_loader = BatchLoader(
        train.images,
        train.labels,
        meta=meta,
        batch_size=batch_size // world_size,
        shuffle=True,
        augment=augment,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    val_loader = BatchLoader(
        val.images,
        val.labels,
        meta=meta,
        batch_size=256,
        rank=rank,
        world_size=world_size,
        pad=False,
    )
    return train_loader, val_loader, meta


def normalized_split(prepared_dir: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (normalised float images, labels): what exported models are fed."""
    split = load_split(prepared_dir, name)
    return normalize(to_tensor(split.images), load_meta(prepared_dir)), split.labels

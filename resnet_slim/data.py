"""Datasets: read a source, split it, write it prepared; load prepared splits as batches.

Sources: `digits` (scikit-learn's bundled 8x8 digits, the offline default), `imagefolder`
(`root/<class>/<image>`), `cifar10` (torchvision's python-format files, never downloaded).
A prepared dataset is a directory with one `.npz` per split (uint8 NHWC images + int64 labels),
`manifest.csv` (one row per image) and `meta.json` (class names, size, normalisation).
"""

import hashlib
import io
import os
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path, read_json, write_json

# ImageNet statistics of [0, 1] RGB pixels: what torchvision's and most published CIFAR models were
# trained with (prepare.normalize: imagenet), so an imported model sees the inputs it expects
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLITS = ("train", "val", "test")


@dataclass
class RawDataset:
    images: np.ndarray  # uint8, N x H x W x 3, already resized
    labels: np.ndarray  # int64, N
    class_names: list[str]
    ids: list[str]  # where each image came from
    sha256: list[str]  # of the source bytes: finds duplicates and leaks across splits
    sizes: list[tuple[int, int]]  # original (width, height)
    skipped: list[str]  # files left out under on_bad_image=skip, with the reason


def to_rgb_array(image: Image.Image, image_size: int) -> np.ndarray:
    """The one preprocessing every image goes through: RGB, square `image_size`, uint8 HWC."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    elif image.mode == "F":  # float grayscale (TIFF): [0, 1] or any range, scaled to 8 bits
        array = np.nan_to_num(np.asarray(image, dtype=np.float64)).clip(0.0, None)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_digits(image_size: int) -> RawDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    gray = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 levels -> 0..255
    images = np.stack([to_rgb_array(Image.fromarray(g), image_size) for g in gray])
    return RawDataset(images=images, labels=digits.target.astype(np.int64),
                      class_names=[str(d) for d in range(10)],
                      ids=[f"digits/{i}" for i in range(len(gray))],
                      sha256=[hashlib.sha256(g.tobytes()).hexdigest() for g in gray],
                      sizes=[(8, 8)] * len(gray), skipped=[])


def printable_name(name: str) -> str:
    """A file name as one printable line: undecodable bytes as \\xff, control characters as \\n."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def name_problem(name: str) -> str | None:
    """Why a file or class name cannot go into manifest.csv, meta.json and the web UI, or None."""
    try:
        name.encode("utf-8")  # Python decodes undecodable bytes of a name as lone surrogates
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "its name contains a control character (newline, tab, ...)"
    return None


def load_imagefolder(root: Path, image_size: int, on_bad_image: str = "fail") -> RawDataset:
    if not root.is_dir():
        raise UserError(f"{root}: imagefolder root not found (expected {root}/<class>/<image>)")
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:  # e.g. no read permission on the root
        raise UserError(f"{root}: cannot list the imagefolder root ({err.strerror or err})") from None
    if len(class_dirs) < 2:
        raise UserError(f"{root}: found {len(class_dirs)} class directories; need at least 2")
    for class_dir in class_dirs:
        if problem := name_problem(class_dir.name):
            raise UserError(f"{root}: class directory '{printable_name(class_dir.name)}': {problem}; "
                            f"rename it (class names go into meta.json and the web UI)")
    images, labels, ids, hashes, sizes, skipped = [], [], [], [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        kept_before = len(images)
        for file in files:
            rel = file.relative_to(root).as_posix()
            try:
                if problem := name_problem(rel):
                    rel = printable_name(rel)
                    raise ValueError(f"{problem}; rename it")
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    raise ValueError(f"not an image file type ({file.suffix or 'no suffix'})")
                data = file.read_bytes()
                if not data:
                    raise ValueError("empty file")
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    sizes.append(image.size)
                    images.append(to_rgb_array(image, image_size))
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
                detail = ("not a recognised image format (corrupt, or not an image)"
                          if isinstance(err, UnidentifiedImageError) else str(err))
                reason = f"{rel}: {err.__class__.__name__}: {detail}"
                if on_bad_image == "fail":
                    raise UserError(f"bad image {reason} (set prepare.on_bad_image: skip to "
                                    f"leave such files out)") from None
                skipped.append(reason)
                continue
            labels.append(label)
            ids.append(rel)
            hashes.append(hashlib.sha256(data).hexdigest())
        if len(images) == kept_before:
            raise UserError(f"{class_dir}: class '{class_dir.name}' has no readable images")
    return RawDataset(images=np.stack(images), labels=np.asarray(labels, dtype=np.int64),
                      class_names=[d.name for d in class_dirs], ids=ids, sha256=hashes,
                      sizes=sizes, skipped=skipped)


def load_cifar10(root: Path, image_size: int) -> RawDataset:
    from torchvision.datasets import CIFAR10

    parts = []
    for train in (True, False):
        try:
            parts.append(CIFAR10(str(root), train=train, download=False))
        except RuntimeError:
            raise UserError(
                f"{root}: CIFAR-10 not found or incomplete. Download cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that "
                f"{root}/cifar-10-batches-py/ exists (this tool never downloads)") from None
    raw = np.concatenate([p.data for p in parts])
    images = np.stack([to_rgb_array(Image.fromarray(a), image_size) for a in raw])
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    split_names = ["train"] * len(parts[0].data) + ["test"] * len(parts[1].data)
    return RawDataset(images=images, labels=labels, class_names=list(parts[0].classes),
                      ids=[f"cifar10/{s}/{i}" for i, s in enumerate(split_names)],
                      sha256=[hashlib.sha256(a.tobytes()).hexdigest() for a in raw],
                      sizes=[(32, 32)] * len(raw), skipped=[])


def select(raw: RawDataset, keep: np.ndarray) -> RawDataset:
    """The images at indices `keep`, in that order."""
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return RawDataset(images=raw.images[keep], labels=raw.labels[keep],
                      class_names=raw.class_names, ids=pick(raw.ids), sha256=pick(raw.sha256),
                      sizes=pick(raw.sizes), skipped=raw.skipped)


def label_conflicts(raw: RawDataset) -> list[str]:
    """Byte-identical images filed under different classes ("a/1.png = b/7.png"), for the user to fix.

    drop_duplicates keeps the first copy (the first class), which may be the wrong label.
    """
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(raw.sha256):
        groups.setdefault(digest, []).append(index)
    return [" = ".join(raw.ids[i] for i in group) for group in groups.values()
            if len({int(raw.labels[i]) for i in group}) > 1]


def drop_duplicates(raw: RawDataset) -> tuple[RawDataset, int]:
    """Keep the first copy of byte-identical images, so no image can land in two splits."""
    _, first = np.unique(np.asarray(raw.sha256), return_index=True)
    keep = np.sort(first)
    return select(raw, keep), len(raw.ids) - len(keep)


def subsample_per_class(raw: RawDataset, max_per_class: int, seed: int) -> RawDataset:
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(raw.labels == c))[:max_per_class]
        for c in range(len(raw.class_names))]))
    return select(raw, keep)


def stratified_split(labels: np.ndarray, *, val_fraction: float, test_fraction: float,
                     seed: int) -> np.ndarray:
    """Assign each index to train/val/test, keeping class proportions in every split."""
    index = np.arange(len(labels))
    try:
        rest, test = train_test_split(index, test_size=test_fraction, stratify=labels,
                                      random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction),
                                      stratify=labels[rest], random_state=seed)
    except ValueError as err:
        counts = np.bincount(labels) if len(labels) else np.zeros(1, dtype=int)
        raise UserError(f"cannot split {len(labels)} images into train/val/test with every class "
                        f"in every split (smallest class: {counts.min()} image(s); add images or "
                        f"drop that class): {err}") from None
    split = np.empty(len(labels), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def normalization_stats(normalize, train_images: np.ndarray) -> dict:
    """meta.json's {mean, std, normalization} for `prepare.normalize`.

    dataset: the training split's per-channel statistics; imagenet: IMAGENET_MEAN/STD; or given
    {mean, std} (3 values each, std > 0). Every stage, ONNX evaluation, the benchmark and the web UI
    read them from meta.json through `normalize`, so the choice made here reaches all of them.
    """
    if normalize == "dataset":
        pixels = train_images.astype(np.float64) / 255.0
        return {"mean": pixels.mean(axis=(0, 1, 2)).round(6).tolist(),
                "std": pixels.std(axis=(0, 1, 2)).clip(1e-3).round(6).tolist(),
                "normalization": "dataset"}
    if normalize == "imagenet":
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "normalization": "imagenet"}
    given = normalize if isinstance(normalize, dict) else getattr(normalize, "__dict__", {})
    try:  # a {mean, std} mapping or params.NormalizeStats
        mean, std = (np.asarray(given[key], dtype=np.float64) for key in ("mean", "std"))
        valid = mean.shape == std.shape == (3,) and np.isfinite([mean, std]).all() and std.min() > 0
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise UserError(f"prepare.normalize must be dataset, imagenet or {{mean: [r, g, b], std: "
                        f"[r, g, b]}} with std > 0; got {normalize!r}")
    return {"mean": mean.tolist(), "std": std.tolist(), "normalization": "custom"}


def write_prepared(out_dir: str | Path, raw: RawDataset, split: np.ndarray, extra_meta: dict,
                   normalize="dataset") -> None:
    """Write the prepared dataset directory atomically (`normalize`: see normalization_stats)."""
    meta = {"class_names": raw.class_names, "image_size": int(raw.images.shape[1]),
            **normalization_stats(normalize, raw.images[split == "train"]),
            "counts": {s: int((split == s).sum()) for s in SPLITS},
            "skipped_images": raw.skipped, **extra_meta}
    manifest = pd.DataFrame({
        "id": raw.ids, "split": split, "label": raw.labels,
        "class_name": [raw.class_names[label] for label in raw.labels], "sha256": raw.sha256,
        "width": [w for w, _ in raw.sizes], "height": [h for _, h in raw.sizes]})
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in SPLITS:
            mask = split == name
            np.savez(tmp / f"{name}.npz", images=raw.images[mask], labels=raw.labels[mask])
        manifest.to_csv(tmp / "manifest.csv", index=False)
        write_json(tmp / "meta.json", meta)


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N


def load_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    meta = read_json(path, what="prepared dataset metadata")
    missing = {"class_names", "image_size", "mean", "std"} - set(meta if isinstance(meta, dict) else ())
    if missing:
        raise UserError(f"{path}: prepared dataset metadata lacks {sorted(missing)}; re-run the "
                        f"prepare stage")
    return meta


def load_manifest(prepared_dir: str | Path) -> pd.DataFrame:
    path = Path(prepared_dir) / "manifest.csv"
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; run the prepare stage first")
    text_columns = {c: str for c in ("id", "split", "class_name", "sha256")}
    try:
        return pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError,
            OSError) as err:
        raise UserError(f"{path}: manifest is not a readable CSV ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'}); re-run the "
                        f"prepare stage") from None


def load_split(prepared_dir: str | Path, name: str) -> Split:
    path = Path(prepared_dir) / f"{name}.npz"
    if not path.is_file():
        raise UserError(f"{path}: prepared split not found; run the prepare stage first")
    try:
        with np.load(path) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # np.load of a non-npz file raises ValueError about pickles; a truncated one BadZipFile
        raise UserError(f"{path}: prepared split is corrupt or incomplete ({err.__class__.__name__});"
                        f" re-run the prepare stage") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 \
            or labels.shape != (len(images),):
        raise UserError(f"{path}: prepared split has images {images.shape} {images.dtype} and labels "
                        f"{labels.shape}; expected N x H x W x 3 uint8 and N labels")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return Split(images=images, labels=torch.from_numpy(labels.astype(np.int64, copy=False)))


def normalize(images: torch.Tensor, meta: dict) -> torch.Tensor:
    """uint8 NCHW -> float NCHW, standardised with the training-set mean/std (the model input)."""
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def preprocess_image(image: Image.Image, meta: dict) -> np.ndarray:
    """One PIL image -> the model input, float32 1 x 3 x S x S.

    The same two steps the test split goes through (`to_rgb_array` in prepare, `normalize` at
    evaluation), so a served prediction sees exactly the pixels the benchmark measured.
    """
    pixels = to_rgb_array(image, int(meta["image_size"]))  # H x W x 3 uint8
    # torch.tensor copies (PIL's array is read-only); NCHW as load_split makes it
    batch = torch.tensor(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
    return normalize(batch, meta).numpy()


def augment_batch(images: torch.Tensor, *, crop_padding: int, hflip: bool,
                  generator: torch.Generator) -> torch.Tensor:
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


def shard_indices(order: torch.Tensor, *, rank: int, world_size: int, pad: bool = True) -> torch.Tensor:
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
    """Batches of (normalised images, targets...) from in-memory tensors.

    Extra per-image tensors (e.g. cached teacher logits) ride along with the labels, so the
    shared training loop can hand them to the loss unchanged. With `world_size` > 1 (DDP), each
    rank iterates its shard (`shard_indices`) of a permutation drawn alike on every rank: the
    order generator has the same seed everywhere and draws nothing else, so each pass reshuffles
    (like DistributedSampler.set_epoch) and the ranks stay disjoint; augmentation draws from a
    per-rank generator.
    """

    def __init__(self, images: torch.Tensor, *targets: torch.Tensor, meta: dict, batch_size: int,
                 shuffle: bool = False, augment=None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True):
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
        shard = len(shard_indices(torch.arange(len(self.images)), rank=self.rank,
                                  world_size=self.world_size, pad=self.pad))
        return (shard + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = shard_indices(order, rank=self.rank, world_size=self.world_size, pad=self.pad)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            images = self.images[idx]
            if self.augment is not None:
                images = augment_batch(images, crop_padding=self.augment.crop_padding,
                                       hflip=self.augment.hflip, generator=self.augment_generator)
            targets = tuple(t[idx] for t in self.targets)
            yield normalize(images, self.meta), (targets[0] if len(targets) == 1 else targets)


def train_val_loaders(prepared_dir: str | Path, *, batch_size: int, augment, seed: int,
                      rank: int = 0, world_size: int = 1):
    """(train loader with augmentation and shuffling, val loader, meta) of a prepared dataset.

    With `world_size` > 1 both are this rank's shards and `batch_size` is the global batch,
    split evenly over the ranks (so the optimisation matches one process).
    """
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} does not split evenly over {world_size} "
                        f"processes; use a multiple of {world_size}")
    meta = load_meta(prepared_dir)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    train_loader = BatchLoader(train.images, train.labels, meta=meta,
                               batch_size=batch_size // world_size, shuffle=True, augment=augment,
                               seed=seed, rank=rank, world_size=world_size)
    val_loader = BatchLoader(val.images, val.labels, meta=meta, batch_size=256, rank=rank,
                             world_size=world_size, pad=False)
    return train_loader, val_loader, meta


def normalized_split(prepared_dir: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (normalised float images, labels): what exported models are fed."""
    split = load_split(prepared_dir, name)
    return normalize(split.images, load_meta(prepared_dir)), split.labels
